"""The simulator: seeded sensor signals and line formats (`signals`), a virtual serial port
fed in real time (`serial_port`), the local cloud ingestion endpoint (`cloud`), and the
`edge-sim` command line (`cli`).
"""

"""Sensor inputs: one module per driver behind the `Driver` protocol, and their decoders."""

from __future__ import annotations

from agent.config import MqttInputConfig, SerialInputConfig, SimulatedInputConfig
from drivers.base import Batch, Driver, DriverError

__all__ = ["Batch", "Driver", "DriverError", "build_driver"]


def build_driver(cfg: SerialInputConfig | SimulatedInputConfig | MqttInputConfig) -> Driver:
    """The runtime driver for a validated input config (not yet opened)."""
    # Imported here, so that importing the protocol pulls in neither pyserial, paho nor numpy.
    if isinstance(cfg, SerialInputConfig):
        from drivers.serial import SerialDriver

        return SerialDriver(cfg)
    if isinstance(cfg, SimulatedInputConfig):
        from drivers.simulated import SimulatedDriver

        return SimulatedDriver(cfg)
    if isinstance(cfg, MqttInputConfig):
        from drivers.mqtt import MqttDriver

        return MqttDriver(cfg)
    raise ValueError(f"no driver for input type {getattr(cfg, 'type', cfg)!r}")

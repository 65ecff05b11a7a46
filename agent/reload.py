"""What a SIGHUP reload can change in a running agent, and what needs a restart.

Live: processing (windows and rules: the processor rebuilds what changed by replaying the log),
actions, upstreams and inputs (each changed one is stopped, drained and started again; the
unchanged ones never notice), `agent.log_level`, `agent.status_interval`,
`agent.shutdown_timeout`, `agent.clock_step` and the health thresholds.
Restart needed: `agent.name` and `agent.data_dir` (the identity and the place of the log), the
whole `log` section (the open database) and `health.listen` (the bound port). Those keep their
running values until the next start, and the reload says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.config import AgentConfig

#: Fields whose new value only a restart applies, as (section, field); field None: the section.
RESTART_NEEDED: tuple[tuple[str, str | None], ...] = (
    ("agent", "name"),
    ("agent", "data_dir"),
    ("log", None),
    ("health", "listen"),
)


@dataclass(slots=True)
class ReloadPlan:
    """The difference between the running config and a new one, as things to do."""

    cfg: AgentConfig
    processing: bool = False
    stop_inputs: list[str] = field(default_factory=list)
    start_inputs: list[str] = field(default_factory=list)
    stop_consumers: list[str] = field(default_factory=list)
    start_upstreams: list[str] = field(default_factory=list)
    start_actions: list[str] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)

    @property
    def changes(self) -> list[str]:
        """What the reload applies, in words, for the log line."""
        out = ["processing"] if self.processing else []
        out += [f"input {n} stopped" for n in self.stop_inputs if n not in self.start_inputs]
        out += [
            f"input {n} {'restarted' if n in self.stop_inputs else 'started'}"
            for n in self.start_inputs
        ]
        started = [f"upstream:{n}" for n in self.start_upstreams]
        started += [f"action:{n}" for n in self.start_actions]
        out += [f"{c} stopped" for c in self.stop_consumers if c not in started]
        out += [f"{c} {'restarted' if c in self.stop_consumers else 'started'}" for c in started]
        return out


def plan_reload(old: AgentConfig, new: AgentConfig) -> ReloadPlan:
    """Compare `old` (running) with `new` (just loaded and valid); pure."""
    keep: dict[str, object] = {}
    restart: list[str] = []
    for section, name in RESTART_NEEDED:
        was, now = getattr(old, section), getattr(new, section)
        if name is None:
            if was != now:
                restart += [
                    f"{section}.{f}"
                    for f in type(was).model_fields
                    if getattr(was, f) != getattr(now, f)
                ]
                keep[section] = was
            continue
        if getattr(was, name) != getattr(now, name):
            restart.append(f"{section}.{name}")
            now = keep.get(section, now)
            keep[section] = now.model_copy(update={name: getattr(was, name)})  # type: ignore[attr-defined]
    cfg = new.model_copy(update=keep)
    plan = ReloadPlan(cfg, restart_needed=restart)

    plan.processing = _without_actions(old) != _without_actions(cfg)
    old_inputs = {i.name: i for i in old.inputs}
    new_inputs = {i.name: i for i in cfg.inputs}
    plan.stop_inputs = [n for n, i in old_inputs.items() if new_inputs.get(n) != i]
    plan.start_inputs = [n for n, i in new_inputs.items() if old_inputs.get(n) != i]

    old_ups = {u.name: u for u in old.upstreams}
    new_ups = {u.name: u for u in cfg.upstreams}
    old_acts = {a.name: a for a in old.processing.actions}
    new_acts = {a.name: a for a in cfg.processing.actions}
    plan.stop_consumers = [f"upstream:{n}" for n, u in old_ups.items() if new_ups.get(n) != u]
    plan.stop_consumers += [f"action:{n}" for n, a in old_acts.items() if new_acts.get(n) != a]
    plan.start_upstreams = [n for n, u in new_ups.items() if old_ups.get(n) != u]
    plan.start_actions = [n for n, a in new_acts.items() if old_acts.get(n) != a]
    return plan


def _without_actions(cfg: AgentConfig) -> object:
    return cfg.processing.model_copy(update={"actions": []})

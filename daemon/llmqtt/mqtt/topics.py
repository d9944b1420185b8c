"""Every topic the daemon uses, derived from the config in one place. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MqttConfig


@dataclass(frozen=True)
class Topics:
    root: str  # <base>/<node>
    fleet: str | None = None  # the fleet topic when fleet mode is on
    fleet_group: str = "llmqtt"

    @classmethod
    def from_config(cls, config: MqttConfig) -> Topics:
        fleet = config.fleet.topic.rstrip("/") if config.fleet.enabled else None
        return cls(root=config.topic_root, fleet=fleet, fleet_group=config.fleet.group)

    @property
    def status(self) -> str:
        return f"{self.root}/status"

    @property
    def health(self) -> str:
        return f"{self.root}/health"

    def request(self, task: str, base: str | None = None) -> str:
        return f"{base or self.root}/request/{task}"

    def response(self, task: str, base: str | None = None) -> str:
        return f"{base or self.root}/response/{task}"

    def cancel(self, task: str, base: str | None = None) -> str:
        return f"{base or self.root}/cancel/{task}"

    def request_bases(self) -> list[str]:
        """Topic prefixes requests arrive under: the node's own, and the fleet's."""
        return [self.root] + ([self.fleet] if self.fleet else [])

    def subscription(self, topic_filter: str, base: str) -> str:
        """Fleet requests are shared: each goes to one member of the group. Fleet cancels are not
        shared, so the member running the request hears them."""
        if base == self.fleet and "/request/" in topic_filter:
            return f"$share/{self.fleet_group}/{topic_filter}"
        return topic_filter

    def task_of(self, topic: str) -> tuple[str, str] | None:
        """`<base>/<kind>/<task>` -> (base, task) for one of our bases; None for anything else."""
        base, _, task = topic.rpartition("/")
        base, _, _kind = base.rpartition("/")
        return (base, task) if base in self.request_bases() and task else None

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

    # Home Assistant's own routes. Requests from HA arrive on `ha_request`, which the shipped broker ACL lets
    # only HA's user write: that, not a reply route, is what makes a request count as HA's. Their answers
    # (errors too) land retained on `ha_state`, which the task's sensor shows.
    def ha_request(self, task: str) -> str:
        return f"{self.root}/ha/{task}/request"

    def ha_state(self, task: str) -> str:
        return f"{self.root}/ha/{task}/state"

    @property
    def ha_requests(self) -> str:
        return f"{self.root}/ha/+/request"

    @property
    def ha_states(self) -> str:
        return f"{self.root}/ha/+/state"

    def ha_task_of(self, topic: str) -> str | None:
        """`<root>/ha/<task>/request` -> task; None for anything else."""
        head, _, kind = topic.rpartition("/")
        base, _, task = head.rpartition("/")
        return task if kind == "request" and base == f"{self.root}/ha" and task else None

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

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
    def base(self) -> str:
        """`<base_topic>`: every node's root is one level below it."""
        return self.root.rpartition("/")[0]

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

    def reply(self, client: str, base: str | None = None) -> str:
        """A requester's own reply route under the node's reply namespace (`<root>/reply/<client>`)."""
        return f"{base or self.root}/reply/{client}"

    def default_reply_filters(self) -> list[str]:
        """What `mqtt.reply_topics` allows by default: each request base's reply namespace and response topics."""
        return [f"{base}/{kind}" for base in self.request_bases() for kind in ("reply/#", "response/+")]

    def reserved_filters(self) -> list[str]:
        """This daemon's own topics that no requester may have it publish on: its state, its inputs, and the
        topics Home Assistant reads as this node's sensor states (`<root>/ha/...`)."""
        own = [f"{self.root}/{name}" for name in ("status/#", "health/#", "ha/#")]
        return own + [f"{base}/{kind}/#" for base in self.request_bases() for kind in ("request", "cancel")]

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

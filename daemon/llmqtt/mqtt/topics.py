"""Every topic the daemon and its tools use, derived from the config in one place. Pure.

Nothing else builds a topic string: the transports, extensions, Home Assistant payloads and `llmqtt ha
remove` all ask a `Topics`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import HomeAssistantConfig, MqttConfig


@dataclass(frozen=True)
class Topics:
    root: str  # <base>/<node>
    fleet: str | None = None  # the fleet topic when fleet mode is on
    fleet_group: str = "llmqtt"
    discovery_prefix: str = "homeassistant"  # Home Assistant's MQTT discovery prefix

    @classmethod
    def from_config(cls, config: MqttConfig, homeassistant: HomeAssistantConfig | None = None) -> Topics:
        fleet = config.fleet.topic.rstrip("/") if config.fleet.enabled else None
        prefix = (homeassistant or HomeAssistantConfig()).discovery_prefix.rstrip("/")
        return cls(root=config.topic_root, fleet=fleet, fleet_group=config.fleet.group, discovery_prefix=prefix)

    # -- the daemon's own ---------------------------------------------------------------------------

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

    def request_filter(self, base: str) -> str:
        return self.request("+", base)

    def cancel_filter(self, base: str) -> str:
        return self.cancel("+", base)

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

    # -- Home Assistant -----------------------------------------------------------------------------

    # Requests from HA arrive on `ha_request`, which the shipped broker ACL lets only HA's user write: that,
    # not a reply route, is what makes a request count as HA's. Their answers (errors and refusals too) land
    # retained on `ha_state`, which the task's sensor shows and the deploy/homeassistant script waits on.
    def ha_request(self, task: str) -> str:
        return f"{self.root}/ha/{task}/request"

    @property
    def ha_request_filter(self) -> str:
        return self.ha_request("+")

    def ha_task_of(self, topic: str) -> str | None:
        """`<root>/ha/<task>/request` -> task; None for anything else."""
        head, _, kind = topic.rpartition("/")
        base, _, task = head.rpartition("/")
        return task if kind == "request" and base == f"{self.root}/ha" and task else None

    def ha_state(self, task: str) -> str:
        """Retained JSON of the task's last result: what its HA sensor shows."""
        return f"{self.root}/ha/{task}/state"

    @property
    def ha_state_filter(self) -> str:
        return self.ha_state("+")

    @staticmethod
    def task_of_ha_state(topic: str) -> str:
        """`<root>/ha/<task>/state` -> task."""
        return topic.split("/")[-2]

    @property
    def ha_birth(self) -> str:
        """Home Assistant's own status topic: `online` when it (re)starts."""
        return f"{self.discovery_prefix}/status"

    def discovery(self, component: str, node_id: str, object_id: str) -> str:
        """HA's per-component discovery config topic of one entity."""
        return f"{self.discovery_prefix}/{component}/{node_id}/{object_id}/config"

    def discovery_filter(self, node_id: str) -> str:
        """Every config this node may have published, in any run."""
        return self.discovery("+", node_id, "+")

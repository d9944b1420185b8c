"""Which reply routes a requester may choose. Pure; no paho.

A request names its reply route (MQTT v5 Response Topic, or `reply_to`), and the daemon publishes there
with its own broker rights. Those rights are wide: the daemon writes Home Assistant's discovery configs,
its retained status and its sensor states. Without a check, a device that the ACL keeps out of
`homeassistant/#` could have the daemon write there for it. So a route must match `mqtt.reply_topics`
(default: this node's `<root>/reply/#` and `<root>/response/+`), and some topics are refused whatever
that list says: `$` topics, the discovery prefix, other nodes' roots, and this node's own
status/health/request/cancel/ha topics. A refused route gets `bad_reply_topic` on the default topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config validates filters with this module, and topics imports config
    from .topics import Topics

MAX_TOPIC_BYTES = 65535  # MQTT's limit for a topic name (a two-byte length)


def is_publishable_topic(topic: str) -> bool:
    """A topic name one may publish on: not empty, no wildcards or NUL, within MQTT's length limit."""
    return bool(topic) and not any(c in topic for c in "+#\0") and len(topic.encode("utf-8")) <= MAX_TOPIC_BYTES


def is_topic_filter(text: str) -> bool:
    """A valid subscription filter: `#` only as the whole last level, `+` only as a whole level."""
    if not text or "\0" in text:
        return False
    levels = text.split("/")
    return all(("#" not in level or (level == "#" and i == len(levels) - 1)) and ("+" not in level or level == "+")
               for i, level in enumerate(levels))


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (`+` one level, `#` this level and all below). Topics starting with `$` only
    match filters that start with `$` too."""
    if topic.startswith("$") and not topic_filter.startswith("$"):
        return False
    want, have = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


def shorten(topic: str, keep: int = 80) -> str:
    """A topic as it may appear in a log line or an error message (a topic can be 64 KB)."""
    return topic if len(topic) <= keep else f"{topic[:keep]}... ({len(topic.encode('utf-8'))} bytes)"


@dataclass(frozen=True)
class ReplyRoutes:
    allowed: tuple[str, ...]  # topic filters a route must match (mqtt.reply_topics)
    refused: tuple[tuple[str, str], ...]  # (topic filter, why) refused whatever `allowed` says
    base: str  # <base_topic>: the parent of every node's root
    own_roots: tuple[str, ...]  # this node's root and the fleet topic: under `base`, but ours

    @classmethod
    def build(cls, topics: Topics, reply_topics: list[str] | None) -> ReplyRoutes:
        """`reply_topics` None means the default: `Topics.default_reply_filters()`."""
        allowed = tuple(reply_topics if reply_topics is not None else topics.default_reply_filters())
        refused = [(f"{topics.discovery_prefix}/#", "is under the Home Assistant discovery prefix")]
        refused += [(f, "is one of this node's own topics") for f in topics.reserved_filters()]
        return cls(allowed, tuple(refused), topics.base, tuple(topics.request_bases()))

    def refusal(self, topic: str) -> str | None:
        """None if a reply may go to `topic`; otherwise why not, as the end of a sentence."""
        if not is_publishable_topic(topic):
            return f"is not a topic one can publish on (empty, wildcards, NUL or over {MAX_TOPIC_BYTES} bytes)"
        if topic.startswith("$"):
            return "starts with $ (broker topics)"
        for topic_filter, why in self.refused:
            if matches(topic_filter, topic):
                return why
        if matches(f"{self.base}/#", topic) and not any(matches(f"{root}/#", topic) for root in self.own_roots):
            return "is under another node's root"
        if not any(matches(topic_filter, topic) for topic_filter in self.allowed):
            return f"is not allowed by mqtt.reply_topics ({', '.join(self.allowed) or 'empty'})"
        return None

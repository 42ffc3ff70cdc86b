"""The shape of what the provider sends: events (webhooks) and payment intents (answers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from surge.payments.errors import InvalidEvent
from surge.payments.provider import ProviderAnswer


def intent_of(answer: ProviderAnswer) -> dict[str, Any] | None:
    """The payment intent in a provider answer (a 402 decline carries it too)."""
    body = answer.body
    if answer.status == 200 and body.get("object") == "payment_intent":
        return body
    intent = body.get("payment_intent")
    if answer.status == 402 and isinstance(intent, dict) and intent.get("id"):
        return intent
    return None


def parse_event(body: bytes) -> dict[str, Any]:
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidEvent("The signed body is not JSON.") from None
    if not (
        isinstance(event, dict)
        and isinstance(event.get("id"), str)
        and 0 < len(event["id"]) <= 255
        and isinstance(event.get("type"), str)
        and isinstance(event.get("created"), int)
        and isinstance(event.get("data"), dict)
        and isinstance(event["data"].get("object"), dict)
    ):
        raise InvalidEvent("The signed body is not a provider event.")
    return event


def payment_id_of(event: Mapping[str, Any]) -> str:
    obj = event["data"]["object"]
    value = obj.get("payment_intent") if obj.get("object") != "payment_intent" else obj.get("id")
    return str(value or obj.get("id") or "-")[:255]

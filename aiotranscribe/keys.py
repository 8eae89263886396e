"""Every typed application key, in one place."""

from __future__ import annotations

import weakref

from aiohttp import web

from aiotranscribe.config import Settings
from aiotranscribe.janitor import Janitor
from aiotranscribe.metrics import Metrics
from aiotranscribe.pool import InferencePool
from aiotranscribe.service import TranscriptionService
from aiotranscribe.store import JobStore
from aiotranscribe.webhooks import Webhooks

settings_key = web.AppKey("settings", Settings)
store_key = web.AppKey("store", JobStore)
pools_key = web.AppKey("pools", dict[str, InferencePool])
janitor_key = web.AppKey("janitor", Janitor)
service_key = web.AppKey("service", TranscriptionService)
metrics_key = web.AppKey("metrics", Metrics)
webhooks_key = web.AppKey("webhooks", Webhooks)
websockets_key: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("websockets")

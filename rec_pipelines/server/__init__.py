"""``recsys serve``'s server: the HTTP application and its batcher (``app``), the served model
and its hot reload (``models``), what one client may ask (``limits``), and several worker
processes behind one port (``workers``); see docs/serving.md."""

from rec_pipelines.server.app import RequestBatcher, create_app, request_rows
from rec_pipelines.server.impressions import ImpressionLog
from rec_pipelines.server.limits import RequestRefused, ServerLimits, timed_protocol
from rec_pipelines.server.models import Arms, LoadedModel, ModelHolder, ReloadToken, alias_version, load_model

__all__ = ["Arms", "ImpressionLog", "LoadedModel", "ModelHolder", "ReloadToken", "RequestBatcher", "RequestRefused",
           "ServerLimits", "alias_version", "create_app", "load_model", "request_rows", "timed_protocol"]

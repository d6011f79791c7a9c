"""skumatch serving: the BentoML matching service, its guards, hot swap, client and build."""

# The BentoML service's name: the key an operator's `services.<name>` config (workers, timeouts)
# is filed under. Here, not in serving.service, so callers that must set BentoML's environment
# before bentoml is imported (the serving benchmark) can use it.
SERVICE_NAME = "skumatch"

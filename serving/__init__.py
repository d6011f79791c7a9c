"""skumatch serving: the BentoML matching service and its build."""

# The BentoML service's name: the key an operator's `services.<name>` config (workers, timeouts)
# is filed under. Here, not in serving.service, so callers that must set BentoML's environment
# before bentoml is imported (the serving benchmark) can use it.
SERVICE_NAME = "skumatch"
# Images per /match_batch request: 64 queries are 384 forward passes with flip and three zooms
# (seconds on a CPU, inside the service's traffic timeout), their pixels about 0.5 GB of float32.
# Here for the same reason: clients and tests read it without importing bentoml.
MAX_BATCH_IMAGES = 64

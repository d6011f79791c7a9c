"""skumatch serving: the BentoML matching service and its build."""

# The BentoML service's name: the key an operator's `services.<name>` config (workers, timeouts)
# is filed under. Here, not in serving.service, so callers that must set BentoML's environment
# before bentoml is imported (the serving benchmark) can use it.
SERVICE_NAME = "skumatch"
# Images per /match_batch request: 64 queries are 384 forward passes with flip and three zooms,
# about 6 s on a 2-core CPU (90 ms a photo, benchmarks/results/batch_size.md), inside the
# service's 30 s traffic timeout.
# Here for the same reason: clients and tests read it without importing bentoml.
MAX_BATCH_IMAGES = 64

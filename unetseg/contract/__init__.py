"""The contract: what the client and the container must agree on, in one place each. TrainConfig (the one
hyperparameter schema), the metric names and log line, SageMaker's environment names and limits, the dataset layout,
the wire formats, the image size limit, the errors a user sees. No torch, no OpenCV, no SageMaker SDK: both sides
import it (tests/test_layers.py checks, module by module)."""

"""The client: what runs in a notebook or on a laptop to build the image and to train, tune and serve on SageMaker
(UNetEstimator and its checks, inputs, uploads, local mode, the predictor, `unetseg image`). It imports the SageMaker
SDK and boto3, never torch: tests/test_layers.py imports every module here in a fresh interpreter to keep it so."""

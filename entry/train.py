"""SAGEMAKER_PROGRAM: the SageMaker training toolkit runs this file from /opt/ml/code.

Hyperparameters, channels and hosts come from the SageMaker environment (unetseg.sagemaker_env); the toolkit's
command-line copy of the hyperparameters is not needed.
"""

import sys

from unetseg.entrypoint import main

if __name__ == "__main__":
    sys.exit(main())

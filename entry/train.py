"""SAGEMAKER_PROGRAM: the SageMaker training toolkit runs this file from /opt/ml/code.

Hyperparameters, channels and hosts come from the SageMaker environment (unetseg.contract.sagemaker_env); the
toolkit's command-line copy of the hyperparameters is not needed.
"""

import sys

from unetseg.container.training_job import main

if __name__ == "__main__":
    sys.exit(main())

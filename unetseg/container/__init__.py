"""The container side: the Python that the image's entry/ files start. The training job (SAGEMAKER_PROGRAM runs
training_job.main), the stop registry through which PID 1 reaches the training processes, and the inference server
(`serve`). The engine they drive (model, training, data/) lives at the package's top level."""

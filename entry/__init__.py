"""The container's files (Dockerfile, SAGEMAKER_PROGRAM, PID 1, serve), installed as the package `unetseg.entry`
(setup.cfg maps it to this folder) so that `unetseg image build` works from an installed wheel as from a checkout.
The Python they start is the package's container side, unetseg/container/."""

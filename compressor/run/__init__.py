"""Running a job: the pipeline, the output folder, checkpoints, progress."""

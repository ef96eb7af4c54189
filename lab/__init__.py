"""The lab: the plumbing that makes the learner's files a real tool (run folders, the command line,
the study, checkpoints, estimates, speed)."""

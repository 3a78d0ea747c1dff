"""The teacher side of the pipeline: prompt rendering (`prompts`) and `distill generate` (`generate`)."""

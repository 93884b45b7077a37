"""Evaluation: reward suites over any prompt source (`reward_suite`) and their statistics (`stats`). The
world's own suites live in `visalign.world.suite` and `visalign.world.motion_suite`."""

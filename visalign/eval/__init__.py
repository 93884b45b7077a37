"""Evaluation: reward suites over any prompt source (`reward_suite`), their statistics (`stats`) and the writer
of the shipped GenEval-style and OCR prompt sets (`prompt_sets`). The world's own suites live in
`visalign.world.suite` and `visalign.world.motion_suite`."""

"""bench/flow_grpo_step.py: the transcribed flow_grpo micro-step and visalign's give the same log-probs and the
same gradients at the same weights, so the bench times equal work."""

import flow_grpo_step


def test_transcribed_flow_grpo_step_does_the_same_work_as_visalign():
    arms, diff = flow_grpo_step.setup_reference(2, size=32)
    assert set(arms) == {"floor", "flow_grpo", "visalign"}
    assert diff["log_prob"] < 1e-6
    assert diff["gradient_scale"] > 0 and diff["gradient"] <= 1e-5 * diff["gradient_scale"]

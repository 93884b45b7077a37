"""bench/flow_grpo_step.py: the transcribed flow_grpo micro-step and visalign's give the same log-probs and the
same gradients at the same weights, so the bench times equal work."""

import flow_grpo_step


def test_transcribed_flow_grpo_step_does_the_same_work_as_visalign():
    arms, diff = flow_grpo_step.setup_reference(2, size=32)
    assert set(arms) == {"floor", "flow_grpo", "visalign"}
    assert diff["log_prob"] < 1e-6
    assert diff["gradient_scale"] > 0 and diff["gradient"] <= 1e-5 * diff["gradient_scale"]


def test_whole_step_arms_run_the_same_denoiser_passes_and_all_train():
    import torch

    variants = {"visalign": [], "visalign, clip 0.2": ["train.clip_range=0.2"]}
    arms, phases = flow_grpo_step.whole_step_arms(prompts_per_step=1, group=2, steps=3, size=32, lr=1e-3,
                                                  variants=variants)
    reference = arms["flow_grpo"]
    denoisers = {"flow_grpo": reference.transformer,
                 **{name: arm.trainer.adapter.denoiser for name, arm in arms.items() if name != "flow_grpo"}}
    assert set(denoisers) == {"flow_grpo", "visalign", "visalign, clip 0.2"}
    assert arms["visalign, clip 0.2"].trainer.cfg.train.clip_range == 0.2  # a variant: the step with its overrides
    passes = {name: [] for name in arms}
    for name, net in denoisers.items():
        net.register_forward_hook(lambda m, a, kw, out, name=name: passes[name].append(
            (tuple(kw["hidden_states"].shape), torch.is_grad_enabled())), with_kwargs=True)
    before = {name: [p.detach().clone() for p in net.parameters()] for name, net in denoisers.items()}
    for arm in arms.values():
        arm()
    # 3 sampling passes without grad, int(3 x 0.99) = 2 trained timesteps with grad, every pass a CFG batch of 4
    sampling = [((4, 4, 16, 16), False)] * 3
    assert passes["flow_grpo"] == passes["visalign"] == sampling + [((4, 4, 16, 16), True)] * 2
    assert passes["visalign, clip 0.2"] == passes["visalign"]
    for name, net in denoisers.items():
        assert any(not torch.equal(a, p) for a, p in zip(before[name], net.parameters(), strict=True)), name
        assert set(phases[name][0]) == {"sampling", "training", "step"}
    assert all(s["step"] == 1 for s in reference.optimizer.state.values())  # one optimizer step per rollout

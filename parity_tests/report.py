"""Print the largest jaxrm-vs-torchref differences on shared weights: `python -m parity_tests.report`."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

import conftest  # noqa: F401  (the repository's conftest.py: highest matmul precision, as under pytest)
import torchref
from jaxrm import convert, pairwise_loss
from parity_tests.conftest import TINY_GPT2, jax_grads_as_state_dict, mixed_pair_batch  # and no TF32


def main(seeds=range(5)):
    reward_diff = score_diff = loss_rel = grad_rel = 0.0
    for seed in seeds:
        torch.manual_seed(seed)
        tm = torchref.RewardModel(**TINY_GPT2.torch_kwargs()).eval()
        jm = convert.from_torch_state_dict(TINY_GPT2, tm.state_dict())
        ids = mixed_pair_batch(seed=seed)
        expected = torchref.per_token_rewards(tm, torch.from_numpy(ids)).detach().numpy()
        rewards = jm(jnp.asarray(ids))
        reward_diff = max(reward_diff, float(np.abs(np.asarray(rewards) - expected).max()))
        c_scores, _, loss = tm(torch.from_numpy(ids), None, None, return_loss=True)
        out = pairwise_loss(rewards, jnp.asarray(ids), TINY_GPT2.pad_id)
        score_diff = max(
            score_diff, float(np.abs(np.asarray(out.chosen_end_scores) - [s.item() for s in c_scores]).max())
        )
        loss_rel = max(loss_rel, abs(float(out.loss) - loss.item()) / abs(loss.item()))
        loss.backward()
        _, grads = jax_grads_as_state_dict(jm, jnp.asarray(ids), TINY_GPT2.pad_id)
        for name, p in tm.named_parameters():
            norm = np.linalg.norm(p.grad.numpy())
            if norm > 1e-6:  # ln_f.bias has an exactly-zero gradient
                grad_rel = max(grad_rel, float(np.linalg.norm(grads[name] - p.grad.numpy()) / norm))
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}, "
        f"{len(seeds)} seeds, GPT-2-shaped tiny config (vocab 50257, d 64, 2 layers), float32"
    )
    print(f"max |reward diff|             {reward_diff:.2e}")
    print(f"max |end score diff|          {score_diff:.2e}")
    print(f"max loss relative diff        {loss_rel:.2e}")
    print(f"max gradient relative diff    {grad_rel:.2e}  (per parameter, norm of difference / norm)")


if __name__ == "__main__":
    main()

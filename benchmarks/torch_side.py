"""torchref's side: the PyTorch reference's train step and scoring call, ready to time.

Train step = `forward(..., return_loss=True)`, `backward`, `clip_grad_norm_`, then the AdamW of
`configure_optimizers`; eager, or with torch.compile'd blocks. bfloat16 = torch autocast.
torch is imported only here, inside prepare_torch, so that `--no-torch` runs without it.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from benchmarks.cases import Case, model_config


def prepare_torch(case: Case, batch: dict, mode: str, compiled: bool = False):
    """(one, info): one() runs a train step ("train"), a scoring call ("score": the original's
    forward to end scores) or the per-position rewards ("rewards") and waits for the device;
    info: the torch device and threads."""
    import torch  # optional dependency: pip install 'jaxrm[torch]'

    import torchref

    cfg = model_config(case)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.from_numpy(batch["input_ids"].astype(np.int64)).to(device)

    def autocast():
        if case.dtype == "bfloat16":
            return torch.autocast(device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    torch.manual_seed(0)
    model = torchref.RewardModel(**cfg.torch_kwargs()).to(device)
    if compiled:
        for i, block in enumerate(model.h):  # the pair loop has .item(): compile the blocks
            model.h[i] = torch.compile(block)
    info = {"device": device, "torch_threads": torch.get_num_threads()}
    if mode == "train":
        model.train()
        with contextlib.redirect_stdout(io.StringIO()):
            opt = model.configure_optimizers(
                weight_decay=0.1, learning_rate=6e-4, betas=(0.9, 0.95), device_type=device
            )

        def one():
            with autocast():
                _, _, loss = model(x, None, None, return_loss=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()

        return one, info

    model.eval()

    def one():
        with torch.inference_mode(), autocast():
            if mode == "score":  # the original's forward: end scores through its loop over pairs
                model(x, None, None, return_loss=False)
            else:  # every position's reward
                torchref.per_token_rewards(model, x)
        sync()

    return one, info

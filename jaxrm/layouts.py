"""Batch layouts that encode each prompt once (TrainConfig.layout; numpy only, no jax).

`rows` (the original, the reference): 2B padded rows, chosen then rejected. From such a batch,
`shared_batch` / `packed_batch` make:
    shared: one row per pair, [prefix][chosen suffix][rejected suffix]
    packed: the same groups, several per row up to a row length (first fit, in pair order)
with, per token, its position id (the rejected suffix's restart where the prefix ends), its
segment id (1, 2, ... the group's place in its row; 0 the row's padding) and its branch id (0 the
prefix, 1 the chosen suffix, 2 the rejected suffix): a token sees earlier tokens of its own segment
in branch 0 or its own branch (jaxrm.kernels.segment_visibility), so every reward the loss reads is
the one the padded row computes (the model is causal).

Which positions the loss reads (jaxrm.loss): the span [div, max(c_end, r_end)) of both rows, PAD
positions of the shorter side included, and the end scores at c_end - 1 and r_end - 1. So the
prefix is the pair's first p = min(div, c_end - 1, r_end - 1) tokens (for an identical pair
min(c_end, r_end) - 1) and each suffix carries its padded row's tokens [p, max(c_end, r_end)),
PADs included as the original feeds them. `read` (2, B, Tv) maps each padded row's position to
the flat index (row * L + column) of its reward in the layout's rows (-1: not carried, never read);
`ends` (2, B), `div` (B,) and `identical` (B,) are the loss's geometry, as jaxrm.loss computes it
from the padded rows.

Dropout: the prefix is computed once, so its dropout masks are shared by both suffixes (in `rows`
each copy of the prompt draws its own).
"""

from __future__ import annotations

import numpy as np

from jaxrm.config import LAYOUTS


def pair_geometry(chosen: np.ndarray, rejected: np.ndarray, c_end: int, r_end: int, explicit: bool):
    """(div, identical) of one pair of padded rows (T,), as jaxrm.loss defines them: the first
    position where they differ (raw ids; with explicit lengths only real tokens, and a position
    inside one side only), 0 and True when none."""
    differs = chosen != rejected
    if explicit:
        t = np.arange(chosen.shape[0])
        c_real, r_real = t < c_end, t < r_end
        differs = (differs & c_real & r_real) | (c_real != r_real)
    if not differs.any():
        return 0, True
    return int(np.argmax(differs)), False


def first_pad_ends(ids: np.ndarray, pad_id: int) -> np.ndarray:
    """(N,) the index of each row's first PAD, else T (jaxrm.loss.sequence_ends, in numpy)."""
    is_pad = ids == pad_id
    return np.where(is_pad.any(axis=1), np.argmax(is_pad, axis=1), ids.shape[1]).astype(np.int32)


def pair_groups(batch: dict, pad_id: int, explicit: bool) -> tuple[list, dict]:
    """The groups of a rows batch (input_ids (2B, T) chosen then rejected; lengths (2B,), read
    when `explicit`): one (prefix ids, [chosen suffix, rejected suffix], p) per pair, and the loss's
    geometry: ends (2, B), div (B,), identical (B,)."""
    ids = np.asarray(batch["input_ids"])
    B = ids.shape[0] // 2
    ends = np.asarray(batch["lengths"], np.int32) if explicit else first_pad_ends(ids, pad_id)  # (2B,)
    groups, divs, identical = [], np.zeros(B, np.int32), np.zeros(B, bool)
    for i in range(B):
        c, r, c_end, r_end = ids[i], ids[B + i], int(ends[i]), int(ends[B + i])
        divs[i], identical[i] = pair_geometry(c, r, c_end, r_end, explicit)
        last = min(c_end, r_end) - 1
        p = last if identical[i] else min(divs[i], last)
        end = max(c_end, r_end)
        groups.append((c[:p], [c[p:end], r[p:end]], p))
    return groups, {"ends": ends.reshape(2, B), "div": divs, "identical": identical}


def group_length(group) -> int:
    prefix, suffixes, _ = group
    return len(prefix) + sum(len(s) for s in suffixes)


def pack(groups: list, row_len: int) -> list[list[int]]:
    """First-fit packing, in group order: rows as lists of group indices, each row's total length
    <= row_len (a longer group gets a row of its own)."""
    rows, free = [], []
    for g, group in enumerate(groups):
        n = group_length(group)
        for row, room in enumerate(free):
            if n <= room:
                rows[row].append(g)
                free[row] -= n
                break
        else:
            rows.append([g])
            free.append(row_len - n)
    return rows


def layout_rows(groups: list, rows: list[list[int]], pad_id: int, multiple: int = 8) -> tuple[dict, list]:
    """The layout's token rows for groups placed in `rows` (lists of group indices): input_ids,
    positions, segment_ids, branch_ids, each (R, L) int32 with L the longest row rounded up to
    `multiple`; and, per group, the flat index of its first suffix token of each branch."""
    L = max(sum(group_length(groups[g]) for g in row) for row in rows)
    L = -(-L // multiple) * multiple
    R = len(rows)
    out = {
        name: np.zeros((R, L), np.int32) for name in ("input_ids", "positions", "segment_ids", "branch_ids")
    }
    out["input_ids"][:] = pad_id
    starts = [None] * len(groups)
    for r, row in enumerate(rows):
        col = 0
        for segment, g in enumerate(row, start=1):
            prefix, suffixes, p = groups[g]
            pieces = [(prefix, 0, 0)] + [(s, branch, p) for branch, s in enumerate(suffixes, start=1)]
            starts[g] = []
            for tokens, branch, first_position in pieces:
                n = len(tokens)
                span = slice(col, col + n)
                out["input_ids"][r, span] = tokens
                out["positions"][r, span] = np.arange(first_position, first_position + n)
                out["segment_ids"][r, span] = segment
                out["branch_ids"][r, span] = branch
                if branch:
                    starts[g].append(r * L + col)
                col += n
    return out, starts


def read_index(groups: list, starts: list, T: int) -> np.ndarray:
    """(K, B, T) int32: for branch k's padded row of pair b, the flat index of position t's reward in
    the layout's rows, -1 where the suffix does not carry t (before p or after its end)."""
    K = len(groups[0][1])
    read = np.full((K, len(groups), T), -1, np.int32)
    for b, (_, suffixes, p) in enumerate(groups):
        for k, suffix in enumerate(suffixes):
            read[k, b, p : p + len(suffix)] = starts[b][k] + np.arange(len(suffix))
    return read


def shared_batch(batch: dict, pad_id: int, explicit: bool = False, multiple: int = 8) -> dict:
    """A rows batch (module docstring) in the shared layout: one row per pair."""
    groups, geometry = pair_groups(batch, pad_id, explicit)
    return _layout_batch(batch, groups, geometry, [[g] for g in range(len(groups))], pad_id, multiple)


def packed_batch(
    batch: dict, pad_id: int, row_len: int, explicit: bool = False, multiple: int = 8, row_multiple: int = 1
) -> dict:
    """A rows batch in the packed layout: the shared groups, first fit into rows of
    max(row_len, the longest group) tokens; the number of rows rounded up to row_multiple with rows
    of padding (fewer distinct shapes to compile)."""
    groups, geometry = pair_groups(batch, pad_id, explicit)
    rows = pack(groups, max(row_len, max(map(group_length, groups))))
    out = _layout_batch(batch, groups, geometry, rows, pad_id, multiple)
    R = -(-len(rows) // row_multiple) * row_multiple
    if R > len(rows):
        for name in ("input_ids", "positions", "segment_ids", "branch_ids"):
            fill = pad_id if name == "input_ids" else 0
            extra = np.full((R - len(rows), out[name].shape[1]), fill, np.int32)
            out[name] = np.concatenate([out[name], extra])  # (R, L)
    return out


def _layout_batch(batch: dict, groups: list, geometry: dict, rows: list, pad_id: int, multiple: int) -> dict:
    tokens, starts = layout_rows(groups, rows, pad_id, multiple)
    T = int(geometry["ends"].max())  # the padded rows' positions the loss can read: [0, max end)
    return {
        **tokens,
        "read": read_index(groups, starts, T),  # (2, B, T)
        **geometry,
        "margins": np.asarray(batch["margins"], np.float32),  # (B,)
    }


def to_layout(batch: dict, layout: str, pad_id: int, explicit: bool, row_len: int) -> dict:
    """A rows batch (the data layer's (2B, T), or the steps' (2, B, T)) in `layout`."""
    ids = np.asarray(batch["input_ids"])
    rows = {"input_ids": ids.reshape(-1, ids.shape[-1]), "margins": batch["margins"]}  # (2B, T)
    if batch.get("lengths") is not None:
        rows["lengths"] = np.asarray(batch["lengths"]).reshape(-1)  # (2B,)
    if layout == "shared":
        return shared_batch(rows, pad_id, explicit)
    if layout == "packed":
        return packed_batch(rows, pad_id, row_len, explicit, row_multiple=4)
    raise ValueError(f"layout must be 'shared' or 'packed' here, got {layout!r}")


def layout_savings(
    sequences: list, seq_len: int, pad_id: int, batch_size: int, explicit: bool = False
) -> dict:
    """What shared / packed would save on (chosen ids, rejected ids) pairs, for `jaxrm lint`: the
    pairs training keeps (non-empty, different, within seq_len), in batches of batch_size in file
    order. Tokens: rows stores 2 x seq_len per pair; real is every token of both sequences (the
    prompt twice); shared is what the shared layout stores (the prompt once, each answer up to the
    longer one's end). packed_rows_per_batch: the mean number of rows packed makes of a batch."""
    kept = [(c, r) for c, r in sequences if c and r and c != r and max(len(c), len(r)) <= seq_len]
    totals = {"rows": 0, "real": 0, "shared": 0}
    packed_rows = []
    for start in range(0, len(kept), batch_size):
        chunk = kept[start : start + batch_size]
        ids = np.full((2, len(chunk), seq_len), pad_id, np.int32)
        lengths = np.zeros((2, len(chunk)), np.int32)
        for i, pair in enumerate(chunk):
            for side, seq in enumerate(pair):
                ids[side, i, : len(seq)], lengths[side, i] = seq, len(seq)
        rows = {"input_ids": ids.reshape(-1, seq_len), "lengths": lengths.reshape(-1)}  # (2B, T)
        groups, _ = pair_groups(rows, pad_id, explicit)
        totals["rows"] += ids.size
        totals["real"] += int(lengths.sum())
        totals["shared"] += sum(map(group_length, groups))
        packed_rows.append(len(pack(groups, max(seq_len, max(map(group_length, groups))))))
    share = lambda a, b: round(1 - a / b, 4) if b else 0.0
    return {
        "pairs": len(kept),
        "batch_size": batch_size,
        "tokens": totals,
        "shared_saves_vs_rows": share(totals["shared"], totals["rows"]),
        "shared_saves_vs_real": share(totals["shared"], totals["real"]),
        "packed_rows_per_batch": round(float(np.mean(packed_rows)), 2) if packed_rows else 0.0,
    }


# ----------------------------------------------------------------------------- K-wise rankings


def common_prefix(sequences: list) -> int:
    """How many leading token ids all the sequences share."""
    n = min(map(len, sequences))
    for seq in sequences[1:]:
        differs = np.asarray(seq[:n]) != np.asarray(sequences[0][:n])
        n = int(np.argmax(differs)) if differs.any() else n
    return n


def ranking_groups(batch: dict, share: bool) -> tuple[list, list[list[int]]]:
    """The groups of a ranking batch (module docstring of jaxrm.ranking_step: input_ids (M, T),
    lengths (M,), offsets (N + 1,)) and, per prompt, the groups holding its responses in order.
    share: one group per prompt, its prefix the first p = min(common token prefix, shortest - 1)
    tokens and one suffix per response; else one group per response (no prefix)."""
    ids, lengths, offsets = batch["input_ids"], batch["lengths"], batch["offsets"]
    sequences = [ids[m, : lengths[m]] for m in range(len(lengths))]
    groups, members = [], []
    for i in range(len(offsets) - 1):
        mine = sequences[offsets[i] : offsets[i + 1]]
        if share:
            p = min(common_prefix(mine), min(map(len, mine)) - 1)
            members.append([len(groups)])
            groups.append((mine[0][:p], [s[p:] for s in mine], p))
        else:
            members.append(list(range(len(groups), len(groups) + len(mine))))
            groups += [(s[:0], [s], 0) for s in mine]
    return groups, members


def _pad_rows(out: dict, R: int, pad_id: int) -> dict:
    """The token rows padded with rows of padding to R rows (fewer distinct shapes to compile)."""
    for name in ("input_ids", "positions", "segment_ids", "branch_ids"):
        if name in out and out[name].shape[0] < R:
            fill = pad_id if name == "input_ids" else 0
            extra = np.full((R - out[name].shape[0], out[name].shape[1]), fill, np.int32)
            out[name] = np.concatenate([out[name], extra])  # (R, L)
    return out


def ranking_rows_shape(lengths, multiple: int = 8) -> tuple[int, int]:
    """(R, L) of ranking_batch's "rows" layout for responses of these lengths, without building it:
    one row per response, R rounded up to a multiple of 4, L the longest rounded up to `multiple`."""
    return -(-len(lengths) // 4) * 4, -(-int(max(lengths)) // multiple) * multiple


def ranking_batch(batch: dict, layout: str, pad_id: int, row_len: int, multiple: int = 8) -> dict:
    """A ranking batch in `layout`: the model's token rows and where each response's end score is.

    rows: one padded row per response (the reference: plain causal rows, no position / segment /
    branch ids); shared: one row per prompt, [prefix][response 1]...[response K]; packed: those
    groups first fit into rows of max(row_len, the longest group) tokens. Out: the token rows
    (R, L) (R rounded up to a multiple of 4); ends (N, K) the flat index (row * L + column) of each
    response's last token; ranks (N, K) and valid (N, K), K the largest group rounded up to a power
    of two (slots past a prompt's responses are not valid); prompt_valid (N,) from the batch's
    "valid" (eval's filler prompts) or all True."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    groups, members = ranking_groups(batch, share=layout != "rows")
    if layout == "packed":
        rows = pack(groups, max(row_len, max(map(group_length, groups))))
    else:
        rows = [[g] for g in range(len(groups))]
    tokens, starts = layout_rows(groups, rows, pad_id, multiple)
    tokens = _pad_rows(tokens, -(-len(rows) // 4) * 4, pad_id)
    if layout == "rows":
        tokens = {"input_ids": tokens["input_ids"]}
    ends = [
        [start + len(suffix) - 1 for g in mine for start, suffix in zip(starts[g], groups[g][1], strict=True)]
        for mine in members
    ]
    sizes = np.diff(batch["offsets"])  # (N,) responses per prompt
    K = 1 << max(1, int(sizes.max() - 1).bit_length())  # a power of two >= 2
    N = len(sizes)
    out = {**tokens, "ends": np.zeros((N, K), np.int32), "ranks": np.zeros((N, K), np.int32)}
    out["valid"] = np.arange(K)[None, :] < sizes[:, None]  # (N, K)
    for i, (mine, start) in enumerate(zip(ends, batch["offsets"][:-1], strict=True)):
        out["ends"][i, : len(mine)] = mine
        out["ranks"][i, : len(mine)] = batch["ranks"][start : start + len(mine)]
    out["prompt_valid"] = np.asarray(batch.get("valid", np.ones(N, bool)), bool)
    return out

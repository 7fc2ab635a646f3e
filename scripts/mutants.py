"""The mutation catalogue: plausible bugs, each of which some test must catch.

Each mutant replaces one exact snippet of one file (it must occur there exactly once) and names
the tests that should fail because of it. `scripts/mutation_check.py` applies each to a scratch
copy of the repository and runs those tests; a mutant none of them catches SURVIVES, and means a
property of the code that no test states.

The bugs are the kind a careful person still writes: a sign, a missing term, a wrong axis or
epsilon, an off-by-one in a mask or a schedule, a step that forgets part of its state. When a
change adds code, add its mutants here (tests/test_mutation_catalogue.py keeps this file in step
with the code: a snippet that no longer matches fails CI).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str  # short, unique, kebab-case
    file: str  # relative to the repository root
    find: str  # exact text, present exactly once in `file`
    replace: str
    tests: tuple  # pytest node ids that should kill it (fast ones)
    bug: str  # what the mutant does, in words


GRADIENTS = "tests/test_gradients.py::"
PROPERTIES = "tests/test_op_properties.py::"
ORACLE = "tests/test_oracle.py::"
MODEL = "tests/test_model.py::"
OPTIM = "tests/test_optim.py::"
TRAIN = "tests/test_train.py::"
CHECKPOINT = "tests/test_checkpoint.py::"
DATA = "tests/test_data.py::"
AUDIT = "tests/test_audit.py::"
GRADCHECK = "tests/test_gradcheck.py::"

OPS = "npllama/ops/"

# two consecutive pieces of AdamW's step, for the mutant that swaps them
_DECAY = ("        if config.weight_decay and decays(p):\n"
          "            p *= 1.0 - lr * config.weight_decay\n")
_UPDATE = ("        # p = p - lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)\n"
           "        xp.multiply(v, 1.0 / bias2, out=scratch)\n"
           "        xp.sqrt(scratch, out=scratch)\n"
           "        scratch += config.eps\n"
           "        xp.divide(m, scratch, out=scratch)\n"
           "        scratch *= lr / bias1\n"
           "        p -= scratch if scratch.dtype == p.dtype else scratch.astype(p.dtype)\n")

CATALOGUE = [
    # --- embedding ------------------------------------------------------------------------------
    Mutant("embedding-repeated-ids-overwrite", OPS + "embedding.py",
           "    xp.add.at(dweight, ids.reshape(-1), dout.reshape(-1, dim))\n",
           "    dweight[ids.reshape(-1)] = dout.reshape(-1, dim)\n",
           (GRADIENTS + "test_embedding_backward_matches_finite_differences",
            PROPERTIES + "test_embedding_backward_adds_up_repeated_ids"),
           "repeated token ids keep only the last row's gradient"),
    Mutant("embedding-gradient-in-float32", OPS + "embedding.py",
           "    dweight = xp.zeros(weight_shape, dtype=dout.dtype)\n",
           "    dweight = xp.zeros(weight_shape, dtype=xp.float32)\n",
           (GRADIENTS + "test_embedding_backward_matches_finite_differences",),
           "the embedding gradient is always float32, whatever the model's dtype"),
    # --- linear ---------------------------------------------------------------------------------
    Mutant("linear-dweight-transposed", OPS + "linear.py",
           "    dweight = dy2.T @ x2\n",
           "    dweight = x2.T @ dy2\n",
           (GRADIENTS + "test_linear_backward_matches_finite_differences",),
           "dW is computed as x^T dy, [in, out] instead of [out, in]"),
    Mutant("linear-dx-not-reshaped", OPS + "linear.py",
           "    dx = (dy2 @ weight).reshape(x.shape)\n",
           "    dx = dy2 @ weight\n",
           (GRADIENTS + "test_linear_backward_matches_finite_differences",),
           "dx keeps the flattened (B*T, K) shape"),
    # --- rmsnorm --------------------------------------------------------------------------------
    Mutant("rmsnorm-backward-in-input-dtype", OPS + "rmsnorm.py",
           "    ct = compute_dtype(xp, dy.dtype)\n",
           "    ct = dy.dtype\n",
           (PROPERTIES + "test_rmsnorm_backward_in_float16_equals_float64_to_float16_precision",
            PROPERTIES + "test_rmsnorm_backward_in_float16_survives_products_beyond_float16"),
           "the backward computes in float16 for float16 inputs: dy * g and dxhat * xhat overflow"),
    Mutant("rmsnorm-no-projection-term", OPS + "rmsnorm.py",
           "    dx = rstd * (dxhat - xhat_c * proj)\n",
           "    dx = rstd * dxhat\n",
           (GRADIENTS + "test_rmsnorm_backward_matches_finite_differences",),
           "dx forgets that r depends on x (treats the normaliser as a constant)"),
    Mutant("rmsnorm-projection-summed", OPS + "rmsnorm.py",
           "    proj = xp.mean(dxhat * xhat_c, axis=-1, keepdims=True)\n",
           "    proj = xp.sum(dxhat * xhat_c, axis=-1, keepdims=True)\n",
           (GRADIENTS + "test_rmsnorm_backward_matches_finite_differences",),
           "the projection sums over C where it should average"),
    Mutant("rmsnorm-eps-outside-sqrt", OPS + "rmsnorm.py",
           "    rstd = 1.0 / xp.sqrt(xp.mean(xf * xf, axis=-1, keepdims=True) + eps)\n",
           "    rstd = 1.0 / (xp.sqrt(xp.mean(xf * xf, axis=-1, keepdims=True)) + eps)\n",
           (GRADIENTS + "test_rmsnorm_backward_matches_finite_differences",
            ORACLE + "test_rmsnorm_equals_metas_rmsnorm_forward_and_backward"),
           "epsilon is added to the RMS instead of to the mean square (not Meta's RMSNorm)"),
    # --- rope -----------------------------------------------------------------------------------
    Mutant("rope-backward-rotates-forward", OPS + "rope.py",
           "    return _rotate(dy, cos, -sin)\n",
           "    return _rotate(dy, cos, sin)\n",
           (GRADIENTS + "test_rope_backward_matches_finite_differences",),
           "the backward applies the rotation instead of its transpose"),
    Mutant("rope-frequency-exponent-i-not-2i", OPS + "rope.py",
           "    inv_freq = float(theta) ** (-xp.arange(0, head_dim, 2, dtype=xp.float64) / head_dim)\n",
           "    inv_freq = float(theta) ** (-xp.arange(0, head_dim // 2, dtype=xp.float64) / head_dim)\n",
           (PROPERTIES + "test_rope_uses_meta_interleaved_pairs",
            ORACLE + "test_rope_equals_metas_complex_multiplication_forward_and_backward"),
           "frequencies theta^(-i/D) instead of theta^(-2i/D)"),
    Mutant("rope-sign-of-sine", OPS + "rope.py",
           "    y[..., 0::2] = even * cos - odd * sin\n",
           "    y[..., 0::2] = even * cos + odd * sin\n",
           (PROPERTIES + "test_rope_preserves_the_norm_of_every_pair",
            GRADIENTS + "test_rope_backward_matches_finite_differences"),
           "a sign slip makes the 2x2 map no rotation"),
    # --- swiglu ---------------------------------------------------------------------------------
    Mutant("swiglu-missing-sigmoid-derivative", OPS + "swiglu.py",
           "    da = dy * b * sig * (1.0 + a * (1.0 - sig))\n",
           "    da = dy * b * sig\n",
           (GRADIENTS + "test_swiglu_backward_matches_finite_differences",),
           "d silu / da forgets the derivative of the sigmoid"),
    Mutant("swiglu-db-without-a", OPS + "swiglu.py",
           "    db = dy * a * sig\n",
           "    db = dy * sig\n",
           (GRADIENTS + "test_swiglu_backward_matches_finite_differences",),
           "db uses sigmoid(a) instead of silu(a)"),
    Mutant("swiglu-sigmoid-of-minus-a", OPS + "swiglu.py",
           "        return 1.0 / (1.0 + xp.exp(-a))\n",
           "        return 1.0 / (1.0 + xp.exp(a))\n",
           (GRADIENTS + "test_swiglu_backward_matches_finite_differences",
            ORACLE + "test_swiglu_equals_torch_silu_gate_forward_and_backward"),
           "sigmoid(-a) for sigmoid(a)"),
    # --- attention ------------------------------------------------------------------------------
    Mutant("attention-backward-ignores-scale", OPS + "attention.py",
           "    q, k, v, out, lse, tile_size, scale = cache\n",
           "    q, k, v, out, lse, tile_size, scale = cache\n    scale = 1.0 / math.sqrt(q.shape[-1])\n",
           (GRADIENTS + "test_attention_backward_matches_finite_differences",),
           "the backward uses 1/sqrt(D) whatever scale the forward was given"),
    Mutant("attention-backward-returns-nan", OPS + "attention.py",
           "    return dq.astype(q.dtype, copy=False), dk.astype(k.dtype, copy=False), "
           "dv.astype(v.dtype, copy=False)\n",
           "    return dq * xp.nan, dk * xp.nan, dv * xp.nan\n",
           (GRADIENTS + "test_attention_backward_matches_finite_differences",
            AUDIT + "test_audit_json_lists_every_op_and_the_model_all_passing"),
           "every attention gradient is NaN (the checker once passed this)"),
    Mutant("attention-mask-sees-next-key", OPS + "attention.py",
           "    return key_pos > query_pos\n",
           "    return key_pos > query_pos + 1\n",
           (PROPERTIES + "test_attention_is_causal",),
           "the causal mask lets each query see one key in its future"),
    Mutant("attention-accumulator-not-rescaled", OPS + "attention.py",
           "            acc = acc * rescale[..., None] + probs @ v[:, :, k0:k1].astype(ct, copy=False)\n",
           "            acc = acc + probs @ v[:, :, k0:k1].astype(ct, copy=False)\n",
           (PROPERTIES + "test_tiled_attention_equals_naive_softmax_attention_for_every_tile_size",),
           "the online softmax rescales the row sum but not the output accumulator"),
    Mutant("attention-lse-without-max", OPS + "attention.py",
           "        lse[:, :, q0:q1] = row_max + xp.log(row_sum)\n",
           "        lse[:, :, q0:q1] = xp.log(row_sum)\n",
           (PROPERTIES + "test_tiled_attention_equals_naive_softmax_attention_for_every_tile_size",
            GRADIENTS + "test_attention_backward_matches_finite_differences"),
           "the saved logsumexp forgets the running max"),
    Mutant("attention-skips-last-key-tile", OPS + "attention.py",
           "        for k0 in range(0, last_visible_key + 1, tile_size):\n",
           "        for k0 in range(0, last_visible_key, tile_size):\n",
           (PROPERTIES + "test_tiled_attention_equals_naive_softmax_attention_for_every_tile_size",),
           "off by one: a key tile that starts at the last visible key is skipped"),
    Mutant("attention-dvec-without-out", OPS + "attention.py",
           "    dvec = (dout_c * out.astype(ct, copy=False)).sum(axis=-1)\n",
           "    dvec = dout_c.sum(axis=-1)\n",
           (GRADIENTS + "test_attention_backward_matches_finite_differences",),
           "D = rowsum(dO) instead of rowsum(dO * O)"),
    Mutant("attention-dv-overwritten-per-query-tile", OPS + "attention.py",
           "            dv_tile += probs.swapaxes(-1, -2) @ dout_tile\n",
           "            dv_tile = probs.swapaxes(-1, -2) @ dout_tile\n",
           (PROPERTIES + "test_attention_gradients_do_not_depend_on_tile_size",
            GRADIENTS + "test_attention_backward_matches_finite_differences"),
           "dV keeps only the last query tile's contribution"),
    Mutant("attention-dk-with-unscaled-q", OPS + "attention.py",
           "            dk_tile += dscores.swapaxes(-1, -2) @ q_tile\n",
           "            dk_tile += dscores.swapaxes(-1, -2) @ q[:, :, q0:q1].astype(ct, copy=False)\n",
           (GRADIENTS + "test_attention_backward_matches_finite_differences",),
           "dK forgets the softmax scale"),
    # --- cross-entropy --------------------------------------------------------------------------
    Mutant("cross-entropy-averages-over-ignored-rows", OPS + "cross_entropy.py",
           "    loss = nll.sum() / max(n_counted, 1)\n",
           "    loss = nll.sum() / max(z.shape[0], 1)\n",
           (PROPERTIES + "test_cross_entropy_ignores_rows_and_averages_over_the_rest",),
           "the mean counts ignored rows"),
    Mutant("cross-entropy-target-sign", OPS + "cross_entropy.py",
           "                           dlogits[rows, targets] - row_scale)\n",
           "                           dlogits[rows, targets] + row_scale)\n",
           (GRADIENTS + "test_cross_entropy_backward_matches_finite_differences",),
           "softmax + onehot instead of softmax - onehot at the target"),
    Mutant("cross-entropy-ignored-rows-not-zeroed", OPS + "cross_entropy.py",
           "    dlogits[~cache.counted] = 0.0  # an ignored row's logits may be inf or nan; 0 * nan would be nan\n",
           "",
           (PROPERTIES + "test_cross_entropy_ignored_rows_get_zero_gradient_even_when_their_logits_are_not_finite",),
           "an ignored row with non-finite logits leaks NaN into the gradient"),
    Mutant("cross-entropy-softmax-without-max-term", OPS + "cross_entropy.py",
           "    dlogits *= (row_scale / (1.0 + rest))[:, None]\n",
           "    dlogits *= (row_scale / rest)[:, None]\n",
           (GRADIENTS + "test_cross_entropy_backward_matches_finite_differences",),
           "the softmax denominator forgets the max's own exp(0) = 1"),
    Mutant("cross-entropy-log-not-log1p", OPS + "cross_entropy.py",
           "    nll = xp.where(counted, (row_max - target_logits) + xp.log1p(rest), 0.0)\n",
           "    nll = xp.where(counted, (row_max - target_logits) + xp.log(rest), 0.0)\n",
           (PROPERTIES + "test_cross_entropy_ignores_rows_and_averages_over_the_rest",),
           "log(rest) where log(1 + rest) is meant"),
    # --- the model: block backward and recompute ------------------------------------------------
    Mutant("block-ffn-residual-gradient-dropped", "npllama/model.py",
           "    dh += dy\n", "",
           (GRADIENTS + "test_model_gradients_match_finite_differences",),
           "dL/dh forgets the residual path y = h + ..."),
    Mutant("block-attention-residual-gradient-dropped", "npllama/model.py",
           "    dx += dh\n", "",
           (GRADIENTS + "test_model_gradients_match_finite_differences",),
           "dL/dx forgets the residual path h = x + ..."),
    Mutant("block-w3-branch-gradient-dropped", "npllama/model.py",
           "    dn2 += dn2_from_b\n", "",
           (GRADIENTS + "test_model_gradients_match_finite_differences",),
           "n2 feeds W1 and W3, but only W1's gradient reaches it"),
    Mutant("block-recompute-uses-default-eps", "npllama/model.py",
           '    norm1 = saved["norm1"] if "norm1" in saved else _norm1(w, saved, config)\n',
           '    norm1 = saved["norm1"] if "norm1" in saved else rmsnorm.forward(saved["x"], w["attention_norm"])\n',
           (MODEL + "test_recompute_on_and_off_give_bitwise_identical_gradients",
            GRADIENTS + "test_model_gradients_match_finite_differences"),
           "the recomputed RMSNorm falls back to the op's default epsilon, not the config's"),
    Mutant("block-ffn-norm-uses-default-eps", "npllama/model.py",
           '    return rmsnorm.forward(saved["h"], w["ffn_norm"], config.norm_eps)\n',
           '    return rmsnorm.forward(saved["h"], w["ffn_norm"])\n',
           (ORACLE + "test_small_models_give_the_oracles_logits_loss_and_every_gradient",),
           "the FFN norm ignores config.norm_eps everywhere (consistent, but not the model asked for)"),
    Mutant("final-norm-eps-differs-in-training", "npllama/model.py",
           '    normed, norm_cache = rmsnorm.forward(h, params["norm.weight"], config.norm_eps)\n',
           '    normed, norm_cache = rmsnorm.forward(h, params["norm.weight"])\n',
           (GRADIENTS + "test_model_gradients_match_finite_differences",),
           "training's final norm uses another epsilon than evaluation's"),
    Mutant("block-recompute-gate-swapped", "npllama/model.py",
           '    gate = saved["gate"] if "gate" in saved else _gate(saved)\n',
           '    gate = saved["gate"] if "gate" in saved else swiglu.forward(saved["b"], saved["a"])\n',
           (MODEL + "test_recompute_on_and_off_give_bitwise_identical_gradients",),
           "the recomputed SwiGLU swaps its inputs: silu(b) * a"),
    Mutant("block-dk-from-dq", "npllama/model.py",
           "    dk = rope.backward(dk_rot.transpose(0, 2, 1, 3), (cos, sin)).reshape(batch, seq, dim)\n",
           "    dk = rope.backward(dq_rot.transpose(0, 2, 1, 3), (cos, sin)).reshape(batch, seq, dim)\n",
           (GRADIENTS + "test_model_gradients_match_finite_differences",),
           "copy-paste: dk is computed from dq"),
    Mutant("block-wv-gradient-through-wk", "npllama/model.py",
           '    dn1_v, grads["wv"] = linear.backward(dv, (n1, w["wv"]))\n',
           '    dn1_v, grads["wv"] = linear.backward(dv, (n1, w["wk"]))\n',
           (GRADIENTS + "test_model_gradients_match_finite_differences",),
           "copy-paste: the value path's input gradient goes through Wk"),
    Mutant("block-attention-scale-of-model-dim", "npllama/model.py",
           "                                          tile_size, 1.0 / math.sqrt(config.head_dim))\n",
           "                                          tile_size, 1.0 / math.sqrt(config.dim))\n",
           (GRADIENTS + "test_model_gradients_match_finite_differences",),
           "the backward's attention scale is 1/sqrt(C), not 1/sqrt(D)"),
    Mutant("output-head-gradient-from-unnormed", "npllama/model.py",
           '    dnormed, grads["output.weight"] = linear.backward(dlogits, (normed, params["output.weight"]))\n',
           '    dnormed, grads["output.weight"] = linear.backward(dlogits, (h, params["output.weight"]))\n',
           (GRADIENTS + "test_model_gradients_match_finite_differences",),
           "the output head's gradient uses the residual stream before the final norm"),
    Mutant("kv-cache-rope-from-position-0", "npllama/model.py",
           "    cos, sin = rope_tables(config, tokens.shape[1], dtype, xp, start=start)\n",
           "    cos, sin = rope_tables(config, tokens.shape[1], dtype, xp, start=0)\n",
           (MODEL + "test_kv_cache_decoding_gives_the_logits_of_a_full_forward",),
           "decoding with a KV cache rotates every new token as if it were at position 0"),
    # --- the optimizer and its schedule ---------------------------------------------------------
    Mutant("adamw-no-first-moment-bias-correction", "npllama/optim.py",
           "        scratch *= lr / bias1\n",
           "        scratch *= lr\n",
           (OPTIM + "test_first_adamw_step_equals_its_closed_form",),
           "m is not divided by 1 - beta1^t"),
    Mutant("adamw-no-second-moment-bias-correction", "npllama/optim.py",
           "        xp.multiply(v, 1.0 / bias2, out=scratch)\n",
           "        xp.multiply(v, 1.0, out=scratch)\n",
           (OPTIM + "test_first_adamw_step_equals_its_closed_form",),
           "v is not divided by 1 - beta2^t"),
    Mutant("adamw-decays-norm-gains", "npllama/optim.py",
           "    return param.ndim >= 2\n",
           "    return param.ndim >= 1\n",
           (OPTIM + "test_first_adamw_step_equals_its_closed_form",),
           "weight decay also shrinks the RMSNorm gains"),
    Mutant("adamw-decay-after-the-update", "npllama/optim.py",
           _DECAY + _UPDATE, _UPDATE + _DECAY,
           (OPTIM + "test_first_adamw_step_equals_its_closed_form",
            ORACLE + "test_adamw_with_clipping_and_cosine_schedule_equals_torch_adamw"),
           "decay is applied after the update, not before (Loshchilov & Hutter, torch: before)"),
    Mutant("clip-also-scales-up", "npllama/optim.py",
           "    return min(1.0, max_norm / (grad_norm + 1e-6))\n",
           "    return max_norm / (grad_norm + 1e-6)\n",
           (OPTIM + "test_first_adamw_step_equals_its_closed_form",),
           "clipping scales small gradients up to the threshold"),
    Mutant("adamw-second-moment-clipped-once", "npllama/optim.py",
           "        scratch *= (1.0 - beta2) * clip * clip\n",
           "        scratch *= (1.0 - beta2) * clip\n",
           (OPTIM + "test_second_adamw_step_equals_its_closed_form",
            ORACLE + "test_adamw_with_clipping_and_cosine_schedule_equals_torch_adamw"),
           "v accumulates c g^2 instead of (c g)^2"),
    Mutant("schedule-warmup-starts-at-zero", "npllama/optim.py",
           "            return self.peak_lr * (step + 1) / self.warmup_steps\n",
           "            return self.peak_lr * step / self.warmup_steps\n",
           (OPTIM + "test_schedule_warms_up_linearly_then_decays_by_cosine_to_ten_percent",),
           "the first step has learning rate 0"),
    Mutant("schedule-decays-to-zero", "npllama/optim.py",
           "        final_lr = self.final_ratio * self.peak_lr\n",
           "        final_lr = 0.0\n",
           (OPTIM + "test_schedule_warms_up_linearly_then_decays_by_cosine_to_ten_percent",),
           "the cosine ends at 0 instead of 10% of the peak"),
    Mutant("schedule-decay-over-all-steps", "npllama/optim.py",
           "        decay_steps = max(self.total_steps - self.warmup_steps, 1)\n",
           "        decay_steps = max(self.total_steps, 1)\n",
           (OPTIM + "test_schedule_warms_up_linearly_then_decays_by_cosine_to_ten_percent",),
           "the cosine spans every step, warmup included, so it never reaches its end"),
    # --- the training loop ----------------------------------------------------------------------
    Mutant("train-lr-of-the-next-step", "npllama/train.py",
           "            lr = schedule(step)\n",
           "            lr = schedule(step + 1)\n",
           (TRAIN + "test_step_k_takes_and_logs_the_schedules_learning_rate_for_k",),
           "step k runs at the schedule's learning rate for step k + 1"),
    Mutant("train-clips-the-norm-before-averaging", "npllama/train.py",
           "            if settings.grad_accum > 1:\n"
           "                for g in grads.values():\n"
           "                    g /= settings.grad_accum\n"
           "            loss_value = loss_sum / settings.grad_accum\n"
           "            grad_norm = optim.global_norm(grads)\n",
           "            grad_norm = optim.global_norm(grads)\n"
           "            if settings.grad_accum > 1:\n"
           "                for g in grads.values():\n"
           "                    g /= settings.grad_accum\n"
           "            loss_value = loss_sum / settings.grad_accum\n",
           (TRAIN + "test_grad_accum_two_half_batches_take_the_clipped_steps_of_one_full_batch",),
           "with --grad-accum, clipping measures the norm of the summed micro-batch gradients"),
    Mutant("train-accumulation-overwrites", "npllama/train.py",
           "                        grads[name] += g\n",
           "                        grads[name] = g\n",
           (TRAIN + "test_grad_accum_two_half_batches_take_the_clipped_steps_of_one_full_batch",),
           "each micro-batch replaces the gradient instead of adding to it"),
    Mutant("resume-forgets-the-sampler", "npllama/train.py",
           '        sampler.restore(saved["sampler"])\n', "",
           (TRAIN + "test_kill_during_a_checkpoint_write_then_resume_reproduces_the_uninterrupted_run_bitwise",),
           "a resumed run draws its batches from the start of the sampler's sequence again"),
    Mutant("resume-forgets-the-optimizer", "npllama/train.py",
           "        opt_state = resumed.optimizer_state\n",
           "        opt_state = optim.init_state(params)\n",
           (TRAIN + "test_kill_during_a_checkpoint_write_then_resume_reproduces_the_uninterrupted_run_bitwise",),
           "a resumed run restarts AdamW's moments from zero"),
    Mutant("resume-skips-a-step", "npllama/train.py",
           '        start_step = int(saved["step"])\n',
           '        start_step = int(saved["step"]) + 1\n',
           (TRAIN + "test_kill_during_a_checkpoint_write_then_resume_reproduces_the_uninterrupted_run_bitwise",),
           "a resumed run starts one step after its checkpoint"),
    # --- checkpoints ----------------------------------------------------------------------------
    Mutant("checkpoint-optimizer-step-not-restored", "npllama/checkpoint.py",
           '            step=document["optimizer_step"],\n',
           "            step=0,\n",
           (CHECKPOINT + "test_save_then_load_is_bitwise_for_params_moments_state_and_tokenizer",
            CHECKPOINT + "test_adamw_step_count_comes_back_so_bias_correction_continues"),
           "AdamW's step count t is not restored, so bias correction restarts"),
    Mutant("checkpoint-missing-file-skipped", "npllama/checkpoint.py",
           '            raise CheckpointError("file is missing", file, fix)\n',
           "            continue\n",
           (CHECKPOINT + "test_a_missing_file_is_named",),
           "a file listed in state.json but missing is skipped instead of reported"),
    Mutant("checkpoint-self-checksum-unchecked", "npllama/checkpoint.py",
           '    if document.get("self_sha256") != _self_sha256(document):\n',
           '    if "self_sha256" not in document:\n',
           (CHECKPOINT + "test_a_changed_state_json_is_caught_by_its_own_checksum",),
           "state.json's own checksum is present but never compared"),
    Mutant("checkpoint-latest-before-the-rename", "npllama/checkpoint.py",
           "            fsync_dir(tmp)\n"
           "            _rename_into_place(tmp, final)\n"
           "        except BaseException:\n"
           "            _remove(tmp)\n"
           "            raise\n"
           "        _write_latest(run_dir, name)\n",
           "            fsync_dir(tmp)\n"
           "            _write_latest(run_dir, name)\n"
           "            _rename_into_place(tmp, final)\n"
           "        except BaseException:\n"
           "            _remove(tmp)\n"
           "            raise\n",
           (CHECKPOINT + "test_a_crash_at_any_file_system_call_of_a_save_leaves_the_last_complete_checkpoint",),
           "'latest' names the new checkpoint before its directory exists"),
    Mutant("checkpoint-prunes-the-newest", "npllama/checkpoint.py",
           "        checkpoints = sorted(_step_dirs(run_dir), key=_step_of, reverse=True)\n",
           "        checkpoints = sorted(_step_dirs(run_dir), key=_step_of)\n",
           (CHECKPOINT + "test_keep_last_keeps_only_the_newest_checkpoints",),
           "keep_last keeps the oldest checkpoints"),
    Mutant("checkpoint-set-aside-version-ignored", "npllama/checkpoint.py",
           "    if set_aside:\n        return set_aside[-1]\n    raise CheckpointError(f\"'latest' names",
           "    raise CheckpointError(f\"'latest' names",
           (CHECKPOINT + "test_a_kill_between_the_renames_of_a_re_save_leaves_the_old_version_loadable",),
           "a re-save killed between its two renames leaves no loadable checkpoint"),
    # --- data -----------------------------------------------------------------------------------
    Mutant("sampler-targets-not-shifted", "npllama/data.py",
           "        return windows[:, :-1], windows[:, 1:]\n",
           "        return windows[:, :-1], windows[:, :-1]\n",
           (DATA + "test_sampler_state_restores_the_exact_batch_sequence",),
           "targets are the inputs themselves, not the next tokens"),
    Mutant("sampler-restore-keeps-the-generator", "npllama/data.py",
           '        self.rng.bit_generator.state = state["bit_generator"]\n', "",
           (DATA + "test_sampler_state_restores_the_exact_batch_sequence",),
           "restoring a sampler keeps its own random state"),
    # --- the gradient checker itself ------------------------------------------------------------
    Mutant("gradcheck-blind-to-nan", "npllama/gradcheck.py",
           "    non_finite = describe_non_finite(grad_host)\n    if non_finite:\n",
           "    non_finite = describe_non_finite(grad_host)\n    if False:\n",
           (GRADCHECK + "test_a_gradient_with_a_non_finite_entry_fails_and_says_so",),
           "the checker compares a NaN gradient, and max(0, nan) = 0 passes it"),
    Mutant("gradcheck-tolerance-loosened", "npllama/gradcheck.py",
           "    passed = bool(math.isfinite(max_rel) and max_rel <= rtol)\n",
           "    passed = bool(math.isfinite(max_rel) and max_rel <= 1e3 * rtol)\n",
           (GRADCHECK + "test_a_slightly_wrong_backward_fails",),
           "the pass threshold is a thousand times looser than stated"),
    Mutant("gradcheck-ignores-dtype", "npllama/gradcheck.py",
           "    if grad_host.dtype != expected.dtype:\n",
           "    if False:\n",
           (GRADCHECK + "test_a_gradient_of_the_wrong_dtype_fails_and_names_both_dtypes",),
           "a float32 gradient passes a float64 check"),
]

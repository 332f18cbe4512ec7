"""Every MoE family of the installed transformers through moeq, as a new user would try it.

    python benchmarks/hf_families_sweep.py [--families qwen3_moe,llama4] [--recipes bf16,fp8,mxfp8]
                                           [--json sweep.json]

A family is a ``transformers/models/<family>/`` package whose modeling code has
``@use_experts_implementation`` experts or one of the experts classes moeq's other
transformers adapters (or refusals) name. For each: a tiny random config (the family's
defaults, every size shrunk: hidden 64, 2 layers, 4 experts, top-2, vocab 128; the text
model of a multimodal family), built on CPU in float32, and for each recipe:

* converted: ``convert_model(copy, recipe)`` finds experts modules;
* modules: every converted module, run on the input it got in the forward, within the
  recipe's bound (tests/test_convert.py's ERROR_BOUND) of the original module on it;
* logits: the converted model's within that bound of the unconverted model's, and
  different from them for fp8/mxfp8. Past the bound, the sweep looks for routing flips
  (a converted module chose other experts for some token than the unconverted model:
  quantization moved a hidden state across a near-tie of a tiny random router, and the
  token's output differs from there on); with one and the modules check passing, the
  family passes and is counted apart ("flip:");
* grads: a backward pass gives every parameter of the converted modules that ran (a
  vision expert gets no text token) a finite gradient, not all zero;
* state_dict: keys, shapes and dtypes unchanged;
* save/load: ``save_pretrained`` + ``from_pretrained(experts_implementation="moeq_<recipe>")``
  comes back converted, with bitwise the same logits;
* generate: three greedy tokens, equal to the reloaded model's (models with a
  generation head).

A family moeq refuses by design (Doge: its experts are vectors, no GEMM) counts as
passing when convert_model raises TypeError naming it. Prints one line per family and
recipe and the pass count; ``--json`` writes the details. Runs in a few minutes on CPU.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import os
import pathlib
import re
import sys
import tempfile
import time
import traceback
import warnings

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import moeq  # noqa: E402,F401
from moeq.convert import ConvertedExperts, convert_model  # noqa: E402

ERROR_BOUND = {"bf16": 1e-2, "fp8": 0.1, "mxfp8": 0.1}  # tests/test_convert.py's
# families moeq refuses with a reason: Doge's experts are vectors; Ergo's experts class
# wraps the decorated forward in math of its own (a per-route, per-expert RMSNorm)
REFUSED = {"doge", "ergo"}
MAX_PARAMETERS = 40_000_000  # a tiny model has well under 1M

_OTHER_EXPERTS = ("Llama4TextMoe", "DbrxExperts", "JetMoeParallelExperts", "SwitchTransformersExperts",
                  "NllbMoeExperts", "LongcatFlashExperts", "Step3p7Experts", "DogeCDMoE")
_MOE_SOURCE = re.compile(r"@use_experts_implementation|^class (" + "|".join(_OTHER_EXPERTS) + r")\(", re.M)

# Sizes every family gets (for the fields its config has).
SIZES = {
    "vocab_size": 128, "hidden_size": 64, "d_model": 64, "intermediate_size": 128, "ffn_hidden_size": 128,
    "d_ff": 64, "moe_intermediate_size": 64, "expert_ffn_hidden_size": 64, "shared_expert_intermediate_size": 64,
    "moe_shared_expert_intermediate_size": 64, "intermediate_size_mlp": 128, "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64, "num_hidden_layers": 2, "num_layers": 2, "n_layers": 2, "encoder_layers": 2,
    "decoder_layers": 2, "num_decoder_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "n_heads": 4,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "num_heads": 4, "head_dim": 16, "kv_channels": 16,
    "d_kv": 16, "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_top_k": 2, "max_position_embeddings": 256, "max_seq_len": 256,
    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "first_k_dense_replace": 0, "mlp_only_layers": [], "decoder_sparse_step": 1, "moe_layer_freq": 1,
    "n_group": 1, "topk_group": 1, "n_shared_experts": 1, "num_shared_experts": 1, "sliding_window": 32,
    "expert_capacity": 16, "encoder_sparse_step": 1, "num_sparse_encoder_layers": 1,
    "num_sparse_decoder_layers": 1, "zero_expert_num": 2, "mlp_layer_types": ["sparse", "sparse"], "moe_k": 2,
    "moe_layer_start_index": 0, "top_k_experts": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}
# Per-family additions (a field the generic sizes leave inconsistent).
OVERRIDES = {
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2}},
    "doge": {"is_moe": True, "num_experts": 16},
    "jetmoe": {"kv_channels": 32},
    # hybrid models: one linear-attention (or conv / mamba) layer and one full-attention layer
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"]},
    # one indexed-attention layer (its own indexer) and one sliding-window layer
    "kolibri1_1": {"layer_types": ["indexed_attention", "sliding_attention"], "index_layers": [0],
                   "kv_source_layers": [0, 1], "index_num_heads": 1, "num_key_value_heads": 2},
    "qwen3_5_moe_text": {"layer_types": ["linear_attention", "full_attention"]},
    "kimi_linear": {"layer_types": ["linear_attention", "full_attention"]},
    "bailing_hybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"], "mamba_n_heads": 8, "mamba_d_head": 16,
                         "mamba_d_state": 16},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 0},
    "zaya": {"num_experts_per_tok": 1},
    "dots3_note_text": {"adapter_in_dim": 64},
    "ernie4_5_vl_moe_text": {"moe_intermediate_size": [64, 64],
                             "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [3, 3, 2]}},
    "mimo_v2_flash": {"num_attention_heads": 8},  # its sliding-window layers have 2x the kv heads
    "qwen4_exp_text": {"layer_types": ["linear_attention", "full_attention"], "indexer_n_heads": 2,
                       "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 16, "indexer_compress_ratio": 4},
    "glm4v_moe_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                           "partial_rotary_factor": 1.0}},
    "inkling2_text": {"vocab_size": 201024},
    "inkling2_loop_text": {"vocab_size": 201024},
    "gemma4_text": {"vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 16, "enable_moe_block": True},
    "diffusion_gemma_text": {"vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 16,
                             "top_k_experts": 2},
    "glm5_next_text": {"qk_rope_head_dim": 0, "qk_nope_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2,
                       "index_topk": 16, "layer_types": ["linear_attention", "indexed_attention"]},
    "hy_v4_vl_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
    "deepseek_v4": {"mlp_layer_types": ["moe", "moe"]},
}


def moe_families() -> list:
    """Every transformers model package with MoE experts moeq knows of (sorted)."""
    import transformers

    root = pathlib.Path(transformers.__file__).parent / "models"
    return sorted({f.parent.name for f in root.glob("*/modeling_*.py") if _MOE_SOURCE.search(f.read_text())})


def _model_types(family: str) -> list:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return [mt for mt in CONFIG_MAPPING.keys() if CONFIG_MAPPING[mt].__module__.split(".")[2] == family]


def _model_class(model_type: str):
    """(model class, kind) to build a model type's text model with: its causal-LM /
    seq2seq / image-text-to-text / base class in transformers' Auto mappings, else the
    class of its modeling module whose config is this model type's (prefer one with a
    generation head); (None, None) if there is none."""
    import importlib

    import transformers
    from transformers.models.auto import modeling_auto as ma
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for mapping, kind in ((ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "causal"),
                          (ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, "seq2seq"),
                          (ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, "causal"),
                          (ma.MODEL_MAPPING_NAMES, "base")):
        if model_type in mapping:
            return getattr(transformers, mapping[model_type]), kind
    config_cls = CONFIG_MAPPING[model_type]
    module = importlib.import_module(config_cls.__module__.replace(".configuration_", ".modeling_"))
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if issubclass(c, transformers.PreTrainedModel) and c.__module__ == module.__name__
               and getattr(c, "config_class", None) is config_cls and "PreTrained" not in c.__name__]
    if not classes:
        return None, None
    heads = [c for c in classes if c.__name__.endswith("ForCausalLM")]
    if heads:
        return heads[0], "causal"
    return min(classes, key=lambda c: len(c.__name__)), "base"


def pick_model_type(family: str) -> str:
    """The family's text model type (``<x>_text`` of a multimodal family), else its own."""
    types = [t for t in _model_types(family) if _model_class(t)[0] is not None]
    text = [t for t in types if t.endswith("_text")]
    if text:
        return min(text, key=len)
    return family if family in types else types[0]


def _fields(config_cls) -> set:
    if dataclasses.is_dataclass(config_cls):
        return {f.name for f in dataclasses.fields(config_cls)}
    return set(inspect.signature(config_cls.__init__).parameters)


def tiny_config(model_type: str):
    """The model type's config with every known size shrunk (its other defaults kept)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type](**_tiny_kwargs(CONFIG_MAPPING[model_type]))


def _tiny_kwargs(cls) -> dict:
    fields = _fields(cls)
    kwargs = {k: copy.deepcopy(v) for k, v in SIZES.items() if k in fields}
    kwargs.update(copy.deepcopy(OVERRIDES.get(getattr(cls, "model_type", ""), {})))
    for key, sub_cls in (getattr(cls, "sub_configs", {}) or {}).items():
        if key in fields and key not in kwargs and hasattr(sub_cls, "model_type"):
            kwargs[key] = _tiny_kwargs(sub_cls)
    return kwargs


def _inputs(kind: str):
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, decoder_input_ids=ids) if kind == "seq2seq" else dict(input_ids=ids)


def _output(model, inputs):
    out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _generate(model, inputs, kind):
    if kind == "base" or not hasattr(model, "generate"):
        return None
    with torch.no_grad():
        return model.generate(input_ids=inputs["input_ids"], max_new_tokens=3, do_sample=False,
                              pad_token_id=0)


def _routing_flips(seen_base: dict, seen: dict) -> str:
    """Which converted modules got other expert choices than the unconverted model's
    (their second positional input is the (T, k) routing), as text; "" for none."""
    out = []
    for fqn, (args, _) in seen.items():
        base_args = seen_base.get(fqn, ((),))[0]
        if len(args) > 1 and len(base_args) > 1 and isinstance(args[1], torch.Tensor) and not args[1].is_floating_point():
            a, b = args[1].sort(-1).values, base_args[1].sort(-1).values
            if a.shape == b.shape:
                n = int((a != b).reshape(a.shape[0], -1).any(-1).sum())
                if n:
                    out.append(f"{fqn}: {n}/{a.shape[0]} tokens routed differently")
    return "; ".join(out)


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # Llama 4's block returns (out, router logits)


def _rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_recipe(base, model_cls, kind, recipe, tmp) -> dict:
    """The checks of the module docstring for one recipe; {check: True/str (failure)}."""
    res = {}
    inputs = _inputs(kind)
    keys = {k: (v.shape, v.dtype) for k, v in base.state_dict().items()}
    model = convert_model(copy.deepcopy(base), recipe)
    fqns = list(model.moeq_converted_fqns)
    res["converted"] = True if fqns else "nothing converted"
    seen, seen_base = {}, {}
    hooks = [m.get_submodule(f).register_forward_pre_hook(lambda _, a, k, f=f, d=d: d.setdefault(f, (a, k)),
                                                          with_kwargs=True)
             for m, d in ((model, seen), (base, seen_base)) for f in fqns]
    with torch.no_grad():
        ref, got = _output(base, inputs), _output(model, inputs)
        for h in hooks:
            h.remove()
        # each converted module that ran, against the original one on the same input
        module_errs = {f: _rel_err(_first(model.get_submodule(f)(*a, **k)), _first(base.get_submodule(f)(*a, **k)))
                       for f, (a, k) in seen.items()}
    worst = max(module_errs.values(), default=float("nan"))
    res["modules"] = True if module_errs and worst <= ERROR_BOUND[recipe] else (
        f"{len(module_errs)}/{len(fqns)} modules ran, worst rel err {worst:.4g}")
    err = _rel_err(got, ref)
    ok = err <= ERROR_BOUND[recipe] and (recipe == "bf16" or err > 0)
    flips = _routing_flips(seen_base, seen)
    if ok:
        res["logits"] = True
    elif flips and res["modules"] is True and err > 0:
        # Quantization moved a hidden state across a routing tie: that token runs other
        # experts from there on. The modules check above covers the numerics.
        res["logits"] = f"flip: rel err {err:.4g} > {ERROR_BOUND[recipe]}, {flips}"
    else:
        res["logits"] = f"rel err {err:.4g} (bound {ERROR_BOUND[recipe]})"
    ran = [f for f in fqns if f in seen]
    model.train()
    _output(model, inputs).float().square().mean().backward()
    bad = []
    for fqn in ran:  # modules no token reached (a vision expert on text input) get no gradient
        grads = [p.grad for p in model.get_submodule(fqn).parameters() if p.requires_grad]
        if not grads or any(g is None or not torch.isfinite(g).all() for g in grads) or all(
                float(g.abs().sum()) == 0 for g in grads):
            bad.append(fqn)
    res["grads"] = True if not bad else f"missing/non-finite/zero grads in {bad}"
    model.zero_grad(set_to_none=True)
    model.eval()
    res["state_dict"] = True if {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == keys else "changed"
    path = os.path.join(tmp, recipe)
    model.save_pretrained(path)
    loaded = model_cls.from_pretrained(path, experts_implementation=f"moeq_{recipe}").eval()
    with torch.no_grad():
        same = torch.equal(_output(loaded, inputs), got)
    loaded_fqns = [f for f, m in loaded.named_modules() if isinstance(m, ConvertedExperts)]
    res["save_load"] = True if same and loaded_fqns == fqns else (
        f"reloaded converted {len(loaded_fqns)}/{len(fqns)}, logits equal: {same}")
    tokens = _generate(model, inputs, kind)
    if tokens is None:
        res["generate"] = "n/a (no generation head)"
    else:
        again = _generate(loaded, inputs, kind)
        res["generate"] = True if tokens.shape[-1] > 0 and torch.equal(tokens, again) else "reloaded model differs"
    return res


def run_family(family: str, recipes) -> dict:
    out = {"family": family}
    t0 = time.time()
    try:
        model_type = pick_model_type(family)
        model_cls, kind = _model_class(model_type)
        out.update(model_type=model_type, model=model_cls.__name__)
        config = tiny_config(model_type)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device("meta"):  # count first: a size the shrinking missed must not fill the memory
                size = sum(p.numel() for p in model_cls._from_config(copy.deepcopy(config)).parameters())
            if size > MAX_PARAMETERS:
                out["build"] = f"config not shrunk enough: {size / 1e6:.0f}M parameters"
                return out
            torch.manual_seed(0)
            base = model_cls._from_config(config).eval()
    except Exception as e:  # noqa: BLE001
        out["build"] = f"{type(e).__name__}: {str(e)[:300]}"
        return out
    if family in REFUSED:
        try:
            convert_model(base, "fp8")
            out["refused"] = "converted although moeq refuses this family"
        except TypeError as e:
            out["refused"] = True if family.lower() in str(e).lower() else str(e)[:200]
        return out
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in recipes:
            try:
                out[recipe] = check_recipe(base, model_cls, kind, recipe, tmp)
            except Exception as e:  # noqa: BLE001
                out[recipe] = {"error": f"{type(e).__name__}: {str(e)[:300]}",
                               "where": traceback.format_exc(limit=-3)[-600:]}
    out["seconds"] = round(time.time() - t0, 1)
    return out


def _ok(value, allow_flips: bool) -> bool:
    return value is True or str(value).startswith("n/a") or (allow_flips and str(value).startswith("flip:"))


def passed(result: dict, recipes, allow_flips: bool = True) -> bool:
    """All checks pass (a logits difference caused by routing flips counts only with
    ``allow_flips``)."""
    if "build" in result:
        return False
    if result["family"] in REFUSED:
        return result.get("refused") is True
    return all(all(_ok(v, allow_flips) for v in result[r].values()) for r in recipes)


def _cell(result: dict, recipe: str) -> str:
    value = result.get(recipe)
    if not isinstance(value, dict):
        return ""
    bad = {k: v for k, v in value.items() if not _ok(v, False)}
    if not bad:
        notes = sorted({str(v) for v in value.values() if str(v).startswith("n/a")})
        return "pass" + (f" ({'; '.join(n.removeprefix('n/a: ').removeprefix('n/a') for n in notes)})" if notes else "")
    return "; ".join(f"{k}: {v}" for k, v in bad.items()).replace("|", "/")


def markdown(results: list, recipes, header: str) -> str:
    """The sweep as a markdown table, one row per family (what the results file holds)."""
    lines = [header, "", f"| family | model built | {' | '.join(recipes)} |", "|---|---|" + "---|" * len(recipes)]
    for res in results:
        if "build" in res:
            cells = [f"not built: {res['build']}"] + [""] * (len(recipes) - 1)
        elif res["family"] in REFUSED:
            why = "refused by design (TypeError naming why)" if res.get("refused") is True else f"FAIL: {res.get('refused')}"
            cells = [why] + [""] * (len(recipes) - 1)
        else:
            cells = [_cell(res, r) for r in recipes]
        lines.append(f"| {res['family']} | {res.get('model', '')} | {' | '.join(cells)} |".replace("\n", " "))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="", help="comma-separated families (default: every MoE family)")
    p.add_argument("--recipes", default="bf16,fp8,mxfp8")
    p.add_argument("--json", default="", help="write the detailed results here")
    p.add_argument("--markdown", default="", help="write the results table here (benchmarks/results/...md)")
    p.add_argument("--from-json", nargs="*", default=[],
                   help="take results from these --json files instead of running (later files replace a family's row)")
    args = p.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    families = [f for f in args.families.split(",") if f] or moe_families()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    results = []
    loaded = {}
    for path in args.from_json:
        with open(path) as f:
            loaded.update({r["family"]: r for r in json.load(f)})
    if loaded:
        families = sorted(loaded)
    for family in families:
        res = loaded.get(family) or run_family(family, recipes)
        results.append(res)
        ok = passed(res, recipes)
        detail = res.get("build") or res.get("refused") or {
            r: ("ok" if all(_ok(v, False) for v in res[r].values())
                else {k: v for k, v in res[r].items() if not _ok(v, False)})
            for r in recipes}
        print(f"{'PASS' if ok else 'FAIL'} {family} ({res.get('model_type')}, {res.get('seconds', '-')}s): {detail}",
              flush=True)
    n_pass = sum(passed(r, recipes) for r in results)
    strict = sum(passed(r, recipes, allow_flips=False) for r in results)
    print(f"\n{n_pass}/{len(results)} families pass (transformers {transformers.__version__}, "
          f"torch {torch.__version__}, recipes {','.join(recipes)}); {strict} with every logits check in bound, "
          f"{n_pass - strict} past the logits bound only where quantization flipped a token's routing")
    summary = (f"{n_pass}/{len(results)} families pass (transformers {transformers.__version__}, torch "
               f"{torch.__version__}); {strict} with every logits check within the bound, {n_pass - strict} past it "
               f"only where quantization moved a token across a routing tie (their modules within the bound)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if args.markdown:
        header = (f"# MoE families of transformers {transformers.__version__} through moeq (CPU sweep)\n\n"
                  f"`python benchmarks/hf_families_sweep.py` (torch {torch.__version__}, transformers "
                  f"{transformers.__version__}, tiny random configs, float32 master weights, kernel `auto` = emulated "
                  f"on CPU; {time.strftime('%Y-%m-%d')}). Checks per recipe: converted, each converted module within "
                  f"the recipe's bound of the original on the same input, logits within the bound of the unconverted "
                  f"model, finite non-zero expert gradients, state_dict unchanged, save_pretrained + "
                  f"from_pretrained(experts_implementation=...) bitwise, greedy generate equal after reload.\n\n"
                  f"{summary}.")
        with open(args.markdown, "w") as f:
            f.write(markdown(results, recipes, header))
    return 0 if n_pass == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

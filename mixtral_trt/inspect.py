"""Human-readable description of an artifact manifest (``mixtral-build inspect``)."""

from __future__ import annotations


def describe(m: dict) -> str:
    lines = [f"{m['stage']} artifact (format {m['format']} v{m['format_version']})"]
    cfg = m.get("config", {})
    if cfg:
        lines.append(
            f"model      Mixtral: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
            f"FFN {cfg['intermediate_size']}, {cfg['num_local_experts']} experts top-{cfg['num_experts_per_tok']}, "
            f"{cfg['num_attention_heads']}/{cfg['num_key_value_heads']} heads x {cfg['head_dim']}, "
            f"vocab {cfg['vocab_size']}, rope theta {cfg['rope_theta']:g}, checkpoint dtype {cfg['torch_dtype']}"
        )
    export = m.get("export", {})
    if export:
        lines.append(f"limits     max batch {export.get('max_batch')}, max sequence {export.get('max_seq_len')} tokens")
    opt = m.get("optimize")
    if opt:
        extra = ", ".join(_option(k, v) for k, v in opt.items() if k not in ("precision", "target", "source"))
        lines.append(f"optimize   precision {opt.get('precision')}, target {opt.get('target')}" + (f", {extra}" if extra else ""))
    eng = m.get("engine")
    if eng:
        lines.append(
            f"engine     {eng.get('target')} {eng.get('trt_version')}, precision {eng.get('precision')}, "
            f"cache {eng.get('cache_dtype')}, SMs {', '.join(map(str, eng.get('target_sms') or [])) or 'build GPU'}"
        )
        for p in eng.get("profiles", []):
            lines.append(f"profile    {p}")
        for plug in eng.get("plugins", []):
            where = plug.get("library") or "Python creator (mixtral_trt.plugins)"
            lines.append(f"plugin     {plug.get('namespace', '')}::{plug['name']} v{plug.get('version', 1)} from {where}")
    io = m.get("io", {})
    for kind in ("inputs", "outputs"):
        entries = io.get(kind, [])
        shown = [e for e in entries if not _is_cache(e["name"]) or e["name"].split(".")[1] == "0"]
        for e in shown:
            dims = ", ".join(map(str, e["shape"]))
            note = f"  (x{sum(_is_cache(x['name']) for x in entries) // 2} layers, key and value)" if _is_cache(e["name"]) else ""
            lines.append(f"{kind[:-1]:<10} {e['name']:<28} {e['dtype']:<9} [{dims}]{note}")
    total = 0
    for name, f in sorted(m.get("files", {}).items()):
        total += f["bytes"]
        lines.append(f"file       {name:<28} {human_size(f['bytes']):>10}  sha256 {f['sha256'][:16]}…")
    lines.append(f"total      {human_size(total)}")
    tools = m.get("tools", {})
    if tools:
        lines.append("tools      " + ", ".join(f"{k} {v}" for k, v in tools.items()))
    return "\n".join(lines)


def _is_cache(name: str) -> bool:
    return name.startswith(("past_key_values.", "present."))


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _option(key: str, value) -> str:
    """One optimize option for humans; int8's weight choices read as which weights are int8."""
    if key == "int8" and isinstance(value, dict):
        names = {"lm_head": "LM head", "router": "router", "attention": "attention projections"}
        quantized = ["experts"] + [names.get(k, k) for k, v in value.items() if v]
        kept = [names.get(k, k) for k, v in value.items() if not v]
        return f"int8 weights: {', '.join(quantized)}" + (f" (fp16: {', '.join(kept)})" if kept else "")
    return f"{key} {value}"

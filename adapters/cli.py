"""`adapter-server adapters import|list|show|delete|export`."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path

from adapters.format import load_adapter, metadata_for
from adapters.importers import (AdapterImportError, adapter_file_bytes, export_peft, import_llama_adapter,
                                import_peft)
from adapters.names import check_name, parse_ref
from adapters.registry import AdapterRegistry
from adapters.store import STORE_ENV, AdapterNotFoundError, AdapterStore, VersionInfo
from adapters.validation import write_validated_adapter


class AdapterCommandError(ValueError):
    """A user error the CLI reports as one line (the entry point prints ValueErrors)."""


def _reporting_not_found(func):
    # AdapterNotFoundError is a LookupError (the registry contract), which the entry point
    # would not treat as a user error.
    def run(args):
        try:
            return func(args)
        except AdapterNotFoundError as e:
            raise AdapterCommandError(str(e)) from None
    return run


def register(subparsers) -> None:
    parser = subparsers.add_parser("adapters", help="import, list, show, delete and export stored adapters")
    sub = parser.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")

    def store_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", type=Path, default=None,
                       help=f"adapter store directory (default: ${STORE_ENV}, else the user data "
                            "directory's llama-adapter-server/adapters)")

    p = sub.add_parser("import", help="import a PEFT (adaption prompt, LoRA, prefix tuning) or official "
                                      "LLaMA-Adapter checkpoint")
    p.add_argument("src", type=Path, help="PEFT adapter folder (its peft_type picks the kind), or official .pth file")
    p.add_argument("--format", required=True, choices=("peft", "llama-adapter"))
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--name", help="store it under this name (a folder of several PEFT adapters "
                                     "gives NAME-<adapter> each)")
    dest.add_argument("--out", type=Path, help="write an adapter file instead of storing it")
    store_flag(p)
    p.add_argument("--adapter-len", type=int, default=10,
                   help="prompt length K of an official checkpoint (splits its L*K rows; default 10)")
    p.add_argument("--raw-gate", action="store_true",
                   help="official checkpoints: use the raw gate instead of tanh(gate)")
    p.add_argument("--peft-adapter", metavar="ADAPTER",
                   help="import only this adapter of a multi-adapter PEFT folder")
    p.add_argument("--model", default="default",
                   help="base model the adapter is for: 'default' or a model path (checks shapes)")
    p.set_defaults(func=_reporting_not_found(_cmd_import))

    p = sub.add_parser("list", help="list stored adapters")
    store_flag(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_reporting_not_found(_cmd_list))

    p = sub.add_parser("show", help="show an adapter's versions, or one version with its metadata")
    p.add_argument("ref", metavar="NAME[@N]")
    store_flag(p)
    p.set_defaults(func=_reporting_not_found(_cmd_show))

    p = sub.add_parser("delete", help="delete an adapter (every version) or one version")
    p.add_argument("ref", metavar="NAME[@N]")
    store_flag(p)
    p.set_defaults(func=_reporting_not_found(_cmd_delete))

    p = sub.add_parser("export", help="export a stored adapter to another format")
    p.add_argument("ref", metavar="NAME[@N]")
    p.add_argument("--format", required=True, choices=("peft",))
    p.add_argument("--out", type=Path, required=True, help="output directory")
    store_flag(p)
    p.set_defaults(func=_reporting_not_found(_cmd_export))


def _cmd_import(args) -> None:
    if args.out is not None and args.store is not None:
        raise ValueError("--store only applies with --name")
    from model.loading import load_model   # heavy; only this command needs the model

    loaded = load_model(args.model)
    if args.format == "peft":
        imported = import_peft(args.src, loaded.config, only=args.peft_adapter)
    else:
        imported = [import_llama_adapter(args.src, loaded.config, args.adapter_len, args.raw_gate)]
    if args.out is not None:
        if len(imported) > 1:
            raise AdapterImportError(
                f"{args.src} holds {len(imported)} adapters ({', '.join(a.label for a in imported)}): "
                "pick one with --peft-adapter, or store them all with --name")
        a = imported[0]
        meta = metadata_for(a.weights, loaded.model, a.source, a.extra, loaded.fingerprint)
        write_validated_adapter(args.out, a.weights, meta, loaded.model, loaded.fingerprint)
        print(f"wrote {args.out} ({meta.kind}, {a.weights.param_count()} parameters, layers "
              f"{_layer_span(a.weights.layers)}{_shape_note(meta)})")
        return
    names = {a.label: args.name if len(imported) == 1 else f"{args.name}-{a.label}" for a in imported}
    for name in names.values():
        check_name(name)     # every name valid before anything is stored
    registry = AdapterRegistry(AdapterStore(args.store), loaded.model, loaded.fingerprint)
    for a in imported:
        meta = metadata_for(a.weights, loaded.model, a.source, a.extra, loaded.fingerprint)
        info = registry.upload(names[a.label], adapter_file_bytes(a.weights, meta), source=a.source)
        print(f"imported {a.label} as {info.ref} ({meta.kind}, {info.param_count} parameters, "
              f"layers {_layer_span(info.layers)}{_shape_note(meta)}) into {registry.store.root}")


def _cmd_list(args) -> None:
    adapters = AdapterStore(args.store).list()
    if args.json:
        print(json.dumps([a.to_dict() for a in adapters], indent=2))
        return
    if not adapters:
        print("no adapters")
        return
    rows = [("NAME", "KIND", "LATEST", "VERSIONS", "K", "LAYERS", "GATE", "PARAMS", "SIZE", "CREATED", "SOURCE")]
    for a in adapters:
        v = a.latest
        rows.append((a.name, v.kind, str(v.version), str(len(a.versions)), str(v.adapter_len or "-"),
                     _layer_span(v.layers), v.gate_kind, str(v.param_count), _size(v.size),
                     datetime.fromtimestamp(v.created).strftime("%Y-%m-%d %H:%M"), v.source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _cmd_show(args) -> None:
    store = AdapterStore(args.store)
    name, version = parse_ref(args.ref)
    if version is None:
        print(json.dumps(store.info(name).to_dict(), indent=2))
        return
    info = store.resolve(args.ref)
    _, meta = load_adapter(store.path(info))
    lora = ({"lora_rank": meta.lora_rank, "lora_alpha": meta.lora_alpha, "lora_rslora": meta.lora_rslora,
             "lora_targets": list(meta.lora_targets)} if meta.kind == "lora" else {})
    print(json.dumps({**info.to_dict(), "base_dim": meta.base_dim, "base_n_layers": meta.base_n_layers,
                      "base_n_heads": meta.base_n_heads, **lora, "extra": meta.extra}, indent=2))


def _cmd_delete(args) -> None:
    name, version = parse_ref(args.ref)
    removed = AdapterStore(args.store).delete(name, version)
    print("deleted " + ", ".join(v.ref for v in removed))


def _cmd_export(args) -> None:
    store = AdapterStore(args.store)
    info: VersionInfo = store.resolve(args.ref)
    weights, meta = load_adapter(store.path(info))
    out = export_peft(weights, meta, args.out)
    print(f"exported {info.ref} to {out} (PEFT {meta.kind})")


def _shape_note(meta) -> str:
    if meta.kind == "lora":
        return f", r={meta.lora_rank} on {','.join(meta.lora_targets)}"
    return f", {'P' if meta.kind == 'prefix-tuning' else 'K'}={meta.adapter_len}"


def _layer_span(layers) -> str:
    layers = list(layers)
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers))


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"

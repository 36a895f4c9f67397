"""Fine-tune every target region in one run: OUT/<domain>/ each (the name sanitised by
``paths.safe_name``), and OUT/manifest.json mapping each domain to its folder."""
from __future__ import annotations

import copy

from accelerate.state import AcceleratorState

from ..data.prepared import PreparedData
from ..engine import distributed as dist_info
from ..errors import InputError
from ..export.manifest import update_manifest
from ..models.config import CrossRecConfig
from ..paths import inside
from ..run_folder import plan_output, replacing
from .finetune import FinetuneConfig, run_finetune


def target_domains(data: PreparedData, base_dir: str, spec: str) -> list[str]:
    if spec != "all":
        names = [d for d in spec.split(",") if d]
        data.domain_codes(names)
        return names
    source = set(CrossRecConfig.from_pretrained(base_dir).pretrain_domains)
    targets = [d for d in data.domain_names if d not in source] or list(data.domain_names)
    if not targets:
        raise InputError("no target domains", field="--domains")
    return targets


def finetune_regions(cfg: FinetuneConfig, base_dir: str, data_dir: str, spec: str, out: str, log=print,
                     force: bool = False) -> dict:
    """Every region's folder is classified before any region trains (run_folder.py): a region that
    already has a finished or unfinished run is refused, naming it, unless --force (replace it) or
    --resume auto (finished regions are kept as they are, unfinished ones continue)."""
    data = PreparedData(data_dir)
    domains = target_domains(data, base_dir, spec)
    # The domain name is data: its folder is a sanitised name proved to stay inside OUT.
    actions, refused = {}, []
    for domain in domains:
        try:
            actions[domain] = plan_output(inside(out, domain), f"finetune (region {domain!r})", force=force,
                                          resume=cfg.train.resume, max_steps=cfg.train.max_steps, log=log)
        except InputError as e:
            refused.append(e)
    if refused:
        raise InputError(f"{len(refused)} of the {len(domains)} regions already have a run in {out}: "
                         + "; ".join(str(e) for e in refused[:3]) + (" ..." if len(refused) > 3 else ""),
                         field="--out")
    records = {}
    for domain in domains:
        if actions[domain] == "done":
            continue
        AcceleratorState._reset_state()  # a fresh engine per region; the process group stays
        with replacing(inside(out, domain), actions[domain], log=log):
            record = run_finetune(copy.deepcopy(cfg), base_dir, data, domain, inside(out, domain), log=log)
        if dist_info.is_main():
            update_manifest(out, base_dir, domain, record)
        records[domain] = record
    return records

"""Issue H: the bad-input table. Each case is a spec that both `cropi run` and `cropi submit`
must refuse with exit code 2 and a message naming `names` (never `secret`), and that the
controller API must refuse (`status`) storing nothing; test_bad_input_table.py runs them all.
`markdown()` renders the table as docs/bad-input.md."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..jobs import tiny_job

SECRET = "sk_SECRET_4f2a"  # a value no message may repeat
DOC = Path(__file__).resolve().parents[2] / "docs" / "bad-input.md"
D = "<data>"  # stands for the folder of the case data files below, in specs and in the doc
S = "<spec>"  # in `names`: the spec's source, its file (run, submit) or "request body 'spec'" (the API)

# Data files the cases name (written once per module into a temporary folder).
FILES: dict[str, str | bytes] = {
    "rows.jsonl": '{"prompt": "1+1=", "answer": "2", "key": "a"}\n{"prompt": "2+2=", "answer": "4", "key": "b"}\n',
    "malformed.jsonl": f'{{"prompt": "1+1=", "answer": "2"}}\n{{"prompt": "{SECRET}", answer: 4}}\n',
    "array-row.jsonl": f'["{SECRET}", 2]\n',
    "latin1.jsonl": '{"prompt": "caf\u00e9", "answer": "1"}\n'.encode("latin-1"),
    "empty.jsonl": "\n\n",
    "rows.csv": "prompt,answer\n1+1=,2\n",
    "fake.parquet": f"not parquet at all {SECRET}\n",
    "no-answer.jsonl": '{"prompt": "1+1=", "solution": "2"}\n',
    "null-answer.jsonl": '{"prompt": "1+1=", "answer": null}\n',
    "dict-answer.jsonl": f'{{"prompt": "1+1=", "answer": {{"value": "{SECRET}"}}}}\n',
    "number-prompt.jsonl": '{"prompt": 12, "answer": "2"}\n',
    "dup-ids.jsonl": f'{{"prompt": "1+1=", "answer": "2", "key": "{SECRET}"}}\n'
                     f'{{"prompt": "2+2=", "answer": "4", "key": "{SECRET}"}}\n',
    "sourced.jsonl": '{"prompt": "1+1=", "answer": "2", "data_source": "gsm8k"}\n',
    "not-a-dataset/readme.txt": "a folder, not a saved dataset\n",
    "model-without-config/weights.bin": "",
}


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # the input, in words (the doc's first column)
    spec: str | bytes | dict[str, Any]  # YAML text or bytes as written; a dict: dotted paths set in a good job
    names: str  # what the message of `cropi run` and `cropi submit` must name
    api_names: str | None = None  # what the raw POST's 422 names, where it differs
    secret: str | None = None  # a value in the input that no message may repeat
    status: int = 422  # the raw POST's HTTP status
    run_exit: int = 2
    submit_exit: int = 2


def _file(name: str) -> str:
    return f"{D}/{name}"


def _pool(name: str, **more: Any) -> dict[str, Any]:
    return {"data.pool": {"source": _file(name), **more}}


_PADDING = "# padding\n" * (1 << 17)  # over the 1 MiB cap of a spec file and a request body
_NESTED = "a: " + "[" * 3000 + "]" * 3000 + "\n"

CASES = [
    # --- the file and its YAML ----------------------------------------------------------------------
    Case("yaml-syntax", "unclosed flow sequence", f"name: x\nrl: [unclosed, {SECRET}\n", f"job spec {S} is not "
         "valid YAML: while parsing a flow sequence (line 2", secret=SECRET),
    Case("yaml-tab", "tab indentation", f"rl:\n\t lr: {SECRET}\n", f"job spec {S} is not valid YAML: "
         "while scanning for the next token; found character '\\t' that cannot start any token (line 2, column 1)",
         secret=SECRET),
    Case("binary", "binary file (NUL byte)", b"name: x\n\x00\x01\x02\x03 junk",
         f"job spec {S} is a binary file, not YAML text (NUL byte at offset 8)", api_names="#x0000 at position 8"),
    Case("binary-not-utf8", "binary file, not UTF-8 either", bytes(range(256)), f"job spec {S} is a binary file, "
         "not YAML text (NUL byte at offset 0)", api_names="There was an error parsing the body", status=400),
    Case("non-utf8", "latin-1 text", "name: caf\u00e9\n".encode("latin-1"), f"job spec {S} is not UTF-8 text "
         "(invalid byte at offset 9)", api_names="There was an error parsing the body", status=400),
    Case("control-char", "a BEL control character", "name: a\x07b\n", "#x0007 at position 7"),
    Case("top-list", "top level is a list", "- name: x\n", "the top level must be a mapping, got list"),
    Case("top-scalar", "top level is a string", f"{SECRET}\n", "the top level must be a mapping, got str",
         secret=SECRET),
    Case("duplicate-key", "a key given twice", f"rl:\n  lr: 0.1\n  lr: {SECRET}\n",
         "rl.lr: duplicate key (line 3; first at line 2)", secret=SECRET),
    Case("anchor", "a YAML anchor", f"a: &{SECRET} 1\nname: x\n", "line 1: an anchor", secret=SECRET),
    Case("alias", "a YAML alias", "name: a\nrl:\n  lr: *nowhere\n", "line 3: an alias"),
    Case("oversized", "a 1.3 MB spec", _PADDING + "name: x\n", f"job spec {S} is 1310728 bytes; a job spec "
         "is at most 1048576 bytes",
         api_names="request body larger than 1048576 bytes", status=413),
    Case("nested", "3000 nested lists", _NESTED, "nested too deeply"),
    Case("int-digits", "a 5000-digit integer", "name: x\nseed: " + "9" * 5000 + "\n", "line 2: not a valid int value"),
    Case("tag-float", "!!float on a word", f"rl:\n  lr: !!float {SECRET}\n", "line 2: not a valid float value",
         secret=SECRET),
    Case("tag-timestamp", "!!timestamp on a word", f"name: !!timestamp {SECRET}\n", "line 1: not a valid "
         "timestamp value", secret=SECRET),
    Case("python-tag", "a python object tag", "name: !!python/object:os.system x\n", "could not determine a "
         "constructor for the tag 'tag:yaml.org,2002:python/object:os.system' (line 1"),
    # --- fields and types ---------------------------------------------------------------------------
    Case("unknown-top", "unknown top-level field", "nmae: x\n", "nmae: unknown field (line 1)"),
    Case("unknown-nested", "unknown field in a section", {"rl.lrr": 0.1}, "rl.lrr: unknown field"),
    Case("unknown-in-list", "unknown field in a validation set",
         {"data.validation": [{"name": "v", "source": "builtin:arith", "sise": 4}]},
         "data.validation.0.sise: unknown field"),
    Case("required-name", "a validation set without a name", {"data.validation": [{"source": "builtin:arith"}]},
         "data.validation.0.name: Field required"),
    Case("required-source", "a pool without a source", {"data.pool": {"size": 4}}, "data.pool.source: Field "
         "required"),
    Case("int-key", "a number as a key", "name: x\n1: 2\n", "1: Keys should be strings (line 2)"),
    Case("section-scalar", "a section that is a number", {"rl": 5}, "rl: Input should be a valid dictionary or "
         "instance of RLSpec (line 17)"),
    Case("list-as-map", "validation sets as a mapping", {"data.validation": {"name": "v"}},
         "data.validation: Input should be a valid list (line 8)"),
    Case("bool-for-int", "stages: true", {"curriculum.stages": True}, "curriculum.stages: Input should be a valid "
         "integer"),
    Case("string-for-int", "a quoted number", {"rl.batch_prompts": "16"}, "rl.batch_prompts: Input should be a "
         "valid integer"),
    Case("float-for-int", "2.0 for an integer", {"rl.batch_prompts": 2.0}, "rl.batch_prompts: Input should be a "
         "valid integer"),
    Case("int-for-bool", "1 for a boolean", {"curriculum.reset_optimizer": 1}, "curriculum.reset_optimizer: Input "
         "should be a valid boolean"),
    Case("secret-for-int", "a string for an integer", {"rollout.n": SECRET}, "rollout.n: Input should be a valid "
         "integer", secret=SECRET),
    # --- numbers ------------------------------------------------------------------------------------
    Case("group-too-small", "rollout.n: 1", {"rollout.n": 1}, "rollout.n: Input should be greater than or equal "
         "to 2"),
    Case("top-p", "top_p above 1", {"rollout.top_p": 1.5}, "rollout.top_p: Input should be less than or "
         "equal to 1"),
    Case("ratio-zero", "select_ratio 0", {"curriculum.select_ratio": 0}, "curriculum.select_ratio: Input should be "
         "greater than 0"),
    Case("sparse-ratio", "sparse_ratio 2", {"influence.sparse_ratio": 2}, "influence.sparse_ratio: Input should be "
         "less than or equal to 1 (line 27)"),
    Case("momentum", "momentum 1.0", {"rl.momentum": 1.0}, "rl.momentum: Input should be less than 1"),
    Case("proj-dim-zero", "proj_dim 0", {"influence.proj_dim": 0}, "influence.proj_dim: Input should be greater "
         "than 0"),
    Case("inf", "lr: .inf", "rl:\n  lr: .inf\n", "rl.lr: Input should be a finite number (line 2)"),
    Case("nan", "temperature: .nan", "rollout:\n  temperature: .nan\n", "rollout.temperature: Input should be a "
         "finite number (line 2)"),
    Case("overflow", "lr: 1e400 (infinite)", "rl:\n  lr: 1e400\n", "rl.lr: Input should be a finite number"),
    # --- sizes (spec_limits) ------------------------------------------------------------------------
    Case("pool-size-cap", "pool size 1.5M", {"data.pool.size": 1_500_000}, "data.pool.size: Value error, must be "
         "at most 1000000"),
    Case("set-size-cap", "validation set of 100001", {"data.validation": [{"name": "v", "source": "builtin:arith",
                                                                           "size": 100_001}]},
         "data.validation.0.size: Input should be less than or equal to 100000"),
    Case("too-many-sets", "101 validation sets", {"data.validation": [{"name": f"v{i}", "source": "builtin:arith"}
                                                                      for i in range(101)]},
         "data.validation: List should have at most 100 items"),
    Case("proj-dim-cap", "proj_dim 2**20+1", {"influence.proj_dim": 2**20 + 1}, "influence.proj_dim: Input should "
         "be less than or equal to 1048576"),
    Case("stages-cap", "10001 stages", {"curriculum.stages": 10_001}, "curriculum.stages: Input should be less than "
         "or equal to 10000"),
    Case("seed-cap", "seed 2**64", {"seed": 2**64}, "seed: Input should be less than or equal to "
         "9223372036854775807"),
    Case("pool-size-zero", "pool size 0", {"data.pool.size": 0}, "data.pool.size: Input should be greater than 0"),
    # --- names --------------------------------------------------------------------------------------
    Case("name-upper", "an uppercase job name", {"name": "Bad_Name"}, "name: Value error, must be a DNS label"),
    Case("name-secret", "a job name that is a secret", {"name": SECRET}, "name: Value error, must be a DNS label",
         secret=SECRET),
    Case("name-long", "a 64-character job name", {"name": "a" * 64}, "name: Value error, must be a DNS label"),
    Case("set-name", "a validation set name with a space", {"data.validation": [{"name": "my set",
                                                                                 "source": "builtin:arith"}]},
         "data.validation.0.name: Value error, must be 1-63 letters"),
    Case("set-name-dup", "two validation sets named alike",
         {"data.validation": [{"name": "v", "source": "builtin:arith?digits=1", "size": 4},
                              {"name": "v", "source": "builtin:arith?digits=2", "size": 4}]},
         "data: evaluation set names must be unique, repeated: v"),
    # --- the model ----------------------------------------------------------------------------------
    Case("model-missing", "a missing model folder", {"model.path": _file("no-model")}, "model.path: "
         f"{D}/no-model does not exist"),
    Case("model-no-config", "a folder without config.json", {"model.path": _file("model-without-config")},
         f"model.path: {D}/model-without-config exists but has no config.json"),
    Case("model-builtin", "an unknown built-in model", {"model.path": "builtin:huge"}, "model.path: unknown "
         "built-in model"),
    Case("model-option", "an unknown built-in model option", {"model.path": "builtin:tiny-arith?layerz=2"},
         "model.path: builtin:tiny-arith: unknown option 'layerz'"),
    Case("model-option-value", "a built-in model option that is not a number",
         {"model.path": f"builtin:tiny-arith?layers={SECRET}"}, "model.path: builtin:tiny-arith: option layers "
         "is not a valid number", secret=SECRET),
    Case("model-heads", "heads not dividing hidden", {"model.path": "builtin:tiny-arith?heads=3"},
         "model.path: builtin:tiny-arith: option hidden must be a multiple of option heads"),
    Case("model-dtype", "dtype fp8", {"model.dtype": "fp8"}, "model.dtype: Input should be 'auto', 'float32', "
         "'bfloat16' or 'float16' (line 3)"),
    # --- data sources -------------------------------------------------------------------------------
    Case("data-missing", "a missing data file", _pool("missing.jsonl"), f"data file {D}/missing.jsonl: not found"),
    Case("data-malformed", "a malformed JSONL row", _pool("malformed.jsonl"), "malformed.jsonl, line 2: malformed "
         "JSON", secret=SECRET),
    Case("data-not-object", "a JSONL row that is an array", _pool("array-row.jsonl"), "array-row.jsonl, line 1: "
         "expected a JSON object, got list", secret=SECRET),
    Case("data-latin1", "a JSONL file that is not UTF-8", _pool("latin1.jsonl"), "latin1.jsonl, line 1: cannot be "
         "read as UTF-8"),
    Case("data-empty", "a JSONL file of blank lines", _pool("empty.jsonl"), "empty.jsonl: no rows"),
    Case("data-csv", "a .csv file", _pool("rows.csv"), "rows.csv: unsupported file type '.csv'"),
    Case("data-fake-parquet", "text named .parquet", _pool("fake.parquet"), "fake.parquet: cannot read as parquet",
         secret=SECRET),
    Case("data-folder", "a folder that is no saved dataset", _pool("not-a-dataset"), "not-a-dataset: folder is not "
         "a saved HF dataset"),
    Case("data-no-prompt", "prompt_field names no field", _pool("rows.jsonl", prompt_field="question"),
         "rows.jsonl, line 1: missing field 'question'"),
    Case("data-no-answer", "rows without the answer field", _pool("no-answer.jsonl"), "no-answer.jsonl, line 1: "
         "missing field 'answer'"),
    Case("data-dotted", "a dotted answer path whose parent is absent",
         _pool("rows.jsonl", answer_field="reward_model.ground_truth"), "missing field 'reward_model.ground_truth' "
         "('reward_model' is absent)"),
    Case("data-null", "a null answer", _pool("null-answer.jsonl"), "null-answer.jsonl, line 1: field 'answer' is "
         "null"),
    Case("data-dict-answer", "an answer that is a mapping", _pool("dict-answer.jsonl"), "dict-answer.jsonl, line 1: "
         "field 'answer' must be a string or number, got dict", secret=SECRET),
    Case("data-number-prompt", "a prompt that is a number", _pool("number-prompt.jsonl"), "number-prompt.jsonl, "
         "line 1: field 'prompt' must be a string or a chat"),
    Case("data-dup-ids", "two rows with one (secret) id", _pool("dup-ids.jsonl", id_field="key"),
         "dup-ids.jsonl, line 2: field 'key' repeats the id of line 1", secret=SECRET),
    Case("data-field-path", "an empty part in a dotted path", _pool("rows.jsonl", prompt_field="a..b"),
         "data.pool.prompt_field: Value error, must be a field name or a dotted path"),
    Case("data-builtin", "an unknown built-in source", {"data.pool.source": "builtin:nope"},
         "data.pool.source: unknown built-in data source 'builtin:nope'"),
    Case("data-arith-query", "a bad builtin:arith option value",
         {"data.validation": [{"name": "v", "source": f"builtin:arith?digits={SECRET}"}]},
         "data.validation[0].source: builtin:arith: digits must look like", secret=SECRET),
    Case("data-all-held-out", "a pool that is all in a validation set",
         {"data.pool": {"source": _file("rows.jsonl")},
          "data.validation": [{"name": "v", "source": _file("rows.jsonl")}]},
         "data.pool: every pool prompt also appears in an evaluation set"),
    # --- templates ----------------------------------------------------------------------------------
    Case("template-field", "a template naming another field", {"data.pool.template": "Q: {%s}" % SECRET},
         "data.pool.template: not a valid format template (it names a field other than {prompt})", secret=SECRET),
    Case("template-brace", "an unclosed brace in a template", {"data.pool.template": "Q: {prompt"},
         "data.pool.template: not a valid format template (expected '}' before end of string)"),
    Case("template-chat", "template: chat on a model without a chat template", {"data.pool.template": "chat"},
         "data.pool.template: template is 'chat' but the model's tokenizer has no chat template"),
    Case("system-no-chat", "system_prompt without template: chat", {"data.pool.system_prompt": "be brief"},
         "data.pool.system_prompt: Value error, only applies with template: chat"),
    # --- verifiers ----------------------------------------------------------------------------------
    Case("verifier-name", "an unknown verifier name", {"data.pool.verifier": "exact"}, "data.pool.verifier: Value "
         "error, must be one of auto, int, math"),
    Case("verifier-file", "a missing verifier file", {"data.pool.verifier": f"{D}/nothere.py:score"},
         f"data.pool.verifier: Value error, file {D}/nothere.py not found"),
    Case("verifier-ref", "a malformed verifier reference", {"data.pool.verifier": "my module:score-it"},
         "data.pool.verifier: Value error, expected module:function"),
    Case("verifier-module", "a verifier module that is not installed", {"data.pool.verifier": "nosuchmod:score"},
         "data.pool.verifier: Value error, cannot import module"),
    Case("verifier-by-source", "verifier_by_source naming an unknown verifier",
         {"data.pool.verifier_by_source": {"gsm8k": "exact"}}, "data.pool.verifier_by_source: Value error, ['gsm8k']"),
    Case("verifier-no-default", "a row whose data_source verifier_by_source lacks",
         _pool("sourced.jsonl", verifier_by_source={"math": "math"}), "data.pool.verifier_by_source: line 1 has a "
         "data_source that is not a key"),
    # --- curriculum, influence, placement -----------------------------------------------------------
    Case("selector", "an unknown selector (secret)", {"curriculum.selector": SECRET}, "curriculum.selector: Input "
         "should be", secret=SECRET),
    Case("params-empty", "an empty parameter pattern", {"influence.params": [" "]}, "influence.params: Value error, "
         "entry 0 is empty"),
    Case("params-last", "last:x as parameter pattern", {"influence.params": ["last:x"]}, "influence.params: Value "
         "error, entry 0: 'last:L' needs a positive whole number"),
    Case("logprob-temp", "logprob_temperature: hot", {"influence.logprob_temperature": "hot"},
         "influence.logprob_temperature: Input should be a valid number"),
    Case("device-gpu", "device: gpu", {"device": "gpu"}, "device: Value error, must be auto, cpu, cuda or cuda:N"),
    Case("device-index", "device: cuda:x", {"device": "cuda:x"}, "device: Value error, must be auto, cpu, cuda"),
    Case("engine-inline", "rollout.engine vllm with executor inline", {"rollout.engine": "vllm"},
         "executor: Value error, rollout.engine vllm runs in the Ray rollout service"),
    Case("engine-unknown", "rollout.engine trt", {"rollout.engine": "trt"},
         "rollout.engine: Input should be 'hf' or 'vllm'"),
    Case("zero-stage", "ray.zero_stage 1", {"executor": "ray", "ray.zero_stage": 1}, "ray.zero_stage: Input "
         "should be 2 or 3"),
]


# ------------------------------------------------------------------ materialising a case
def spec_bytes(case: Case, data: str = D) -> bytes:
    """The case's spec file, with `data` for the data folder."""
    if isinstance(case.spec, bytes):
        return case.spec
    if isinstance(case.spec, str):
        return case.spec.replace(D, data).encode()
    job = tiny_job(name="bad-input")
    for dotted, value in case.spec.items():
        *parents, last = dotted.split(".")
        part = job
        for key in parents:
            part = part.setdefault(key, {})
        part[last] = json.loads(json.dumps(value).replace(D, data)) if isinstance(value, (str, dict, list)) \
            else copy.deepcopy(value)
    return yaml.safe_dump(job, sort_keys=False).encode()


def fill(text: str, data: str | Path, spec: str | Path) -> str:
    """`text` with the data folder and the spec's source for D and S."""
    return text.replace(D, str(data)).replace(S, str(spec))


def write_data_files(folder: Path) -> None:
    for name, content in FILES.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


def markdown() -> str:
    """docs/bad-input.md: the table."""
    lines = [
        "# Bad input",
        "",
        "Every bad input below is refused with exit code 2 by both `cropi run` and `cropi submit`, with one",
        "message naming what is wrong (field path, file, row or line) and never a value of the input; the",
        "controller API answers the raw spec with the HTTP status given, and stores nothing. A refused",
        "`cropi run` creates no run folder; a refused submit leaves the controller's Redis and store as they were.",
        "",
        f"Generated from `tests/security/test_bad_input_table.py` (`python -m tests.security.test_bad_input_table "
        f"--markdown`), which runs each case both ways; `{D}` is a folder of the test's data files.",
        "",
        "| # | case | input | the message names | run | submit | HTTP |",
        "|---|------|-------|-------------------|-----|--------|------|",
    ]
    for i, case in enumerate(CASES, 1):
        named = f"`{case.names}`" + (f" (API: `{case.api_names}`)" if case.api_names else "")
        lines.append(f"| {i} | {case.id} | {case.what}{' (secret value)' if case.secret else ''}: "
                     f"{_shown(case)} | {named.replace('|', '&#124;')} | {case.run_exit} | {case.submit_exit} "
                     f"| {case.status} |")
    lines += [
        "",
        "Not in the table, since only one of the two refuses them, by design: a `device` this machine lacks",
        "(`cropi run` checks its own CUDA devices; the controller cannot know its workers'), a verifier file",
        "that fails to import (`cropi run` imports the user's code up front; the controller only checks that",
        "the file exists, and never runs it), a job name with a dot (`tenant.name`: the controller's key form,",
        "which it refuses from users; an embedded run has no tenants), and a run folder holding another spec's",
        "run (`cropi run --out` only).",
    ]
    return "\n".join(lines) + "\n"


def _shown(case: Case) -> str:
    if isinstance(case.spec, dict):
        text = ", ".join(f"{k}: {json.dumps(v)}" for k, v in case.spec.items())
    elif isinstance(case.spec, bytes):
        text = repr(case.spec)[2:-1]
    else:
        text = json.dumps(case.spec)[1:-1]
    text = text if len(text) <= 70 else text[:67] + "..."
    return "`" + text.replace("|", "&#124;").replace("`", "'") + "`"

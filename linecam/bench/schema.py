"""JSON Schema of a benchmark results file (``benchmarks/results/bench.json``).

Checked every time results are written, so a results file that a README table is
generated from always has the fields the table reads.
"""

from __future__ import annotations

from typing import Any

import jsonschema

_NUM = {"type": ["number", "null"]}
_INT = {"type": "integer", "minimum": 0}

SUMMARY = {
    "type": "object",
    "required": ["n", "mean", "min", "p50", "p90", "p99", "max"],
    "properties": {"n": _INT, **{k: _NUM for k in ("mean", "min", "p50", "p90", "p99", "max")}},
}

RESOURCES = {
    "type": "object",
    "required": ["cpu_percent_process", "cpu_percent_children", "cpu_percent_other", "rss_mb_max"],
    "properties": {k: _NUM for k in ("seconds", "cpu_percent_process", "cpu_percent_children",
                                      "cpu_percent_other", "rss_mb_max", "children_rss_mb_max")},
}

STAGES = {
    "type": "object",
    "required": ["queue", "preprocess", "inference", "postprocess", "total"],
    "additionalProperties": SUMMARY,
}

PIPELINE_RUN = {
    "type": "object",
    "required": ["setting", "offered_fps_target", "warmup", "seconds", "offered_fps", "processed",
                 "throughput_fps", "dropped", "dropped_during_warmup", "latency_ms", "resources"],
    "properties": {
        "setting": {"type": "object", "required": ["workers", "intra_op_threads", "queue_size", "label"]},
        "offered_fps_target": _NUM,
        "offered_fps": {"type": "number"},
        "throughput_fps": {"type": "number", "minimum": 0},
        "processed": _INT,
        "dropped": _INT,
        "dropped_during_warmup": _INT,
        "latency_ms": STAGES,
        "resources": RESOURCES,
        "cpu_ms_per_frame": {"type": "object", "additionalProperties": {"type": "number"}},
        "paired_ceiling_fps": {"type": "number", "exclusiveMinimum": 0},
        "e2e": {
            "type": "object",
            "required": ["verdicts_published", "verdicts_received", "lost", "latency_ms"],
            "properties": {"latency_ms": {"type": "object", "required": ["e2e", "publish_to_receive"],
                                          "additionalProperties": SUMMARY}},
        },
    },
}

CEILING_RUN = {
    "type": "object",
    "required": ["setting", "label", "warmup", "seconds", "calls", "throughput_fps", "latency_ms", "resources"],
    "properties": {
        "setting": {"type": "object", "required": ["streams", "intra_op_threads"]},
        "throughput_fps": {"type": "number", "minimum": 0},
        "latency_ms": SUMMARY,
        "resources": RESOURCES,
    },
}

HEADLINE_KEYS = ("ceiling_steadiness", "ceiling_fps", "ceiling_before_fps", "ceiling_after_fps", "ceiling_min_fps",
                 "pipeline_vs_paired_ceiling", "pipeline_fps", "pipeline_vs_ceiling",
                 "bare_path_fps", "bare_path_vs_ceiling",
                 "daemon_cpu_ms_per_frame", "bare_cpu_ms_per_call", "cpu_bound_limit",
                 "cpu_budget_ms_per_frame", "cpu_outside_run_ms_per_frame",
                 "sustained_fps_zero_drops", "sustained_vs_ceiling",
                 "naive_fps", "naive_vs_ceiling", "pipeline_vs_naive", "e2e_p99_ms", "inference_p99_ms",
                 "e2e_minus_inference_p99_ms", "offered_fps_at_80pct", "dropped_at_80pct")

RESULTS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "linecam benchmark results",
    "type": "object",
    "required": ["schema_version", "started_utc", "command", "quick", "machine", "workload", "modes", "targets",
                 "headline", "seconds"],
    "properties": {
        "schema_version": {"const": 1},
        "started_utc": {"type": "string"},
        "command": {"type": "string", "minLength": 1},
        "quick": {"type": "boolean"},
        "seconds": {"type": "number"},
        "machine": {
            "type": "object",
            "required": ["cpu_model", "cpu_logical", "cpu_usable", "memory_gb", "gpus", "libraries", "python",
                         "os", "load_average_at_start"],
            "properties": {
                "cpu_model": {"type": "string"},
                "cpu_logical": {"type": "integer", "minimum": 1},
                "gpus": {"type": "array"},
                "libraries": {"type": "object", "required": ["numpy", "onnxruntime", "paho-mqtt"]},
            },
        },
        "workload": {"type": "object", "required": ["bundle", "frames", "durations_s"]},
        "targets": {"type": "object", "required": ["pipeline_vs_ceiling_min", "e2e_minus_inference_p99_ms_max",
                                                   "dropped_at_80pct_max"]},
        "modes": {
            "type": "object",
            "properties": {
                "model": {
                    "type": "object",
                    "required": ["ceiling", "best", "ceiling_fps", "bare_path"],
                    "properties": {
                        "ceiling": {"type": "array", "minItems": 1, "items": CEILING_RUN},
                        "ceiling_fps": {"type": "number", "exclusiveMinimum": 0},
                        "ceiling_after": CEILING_RUN,
                        "bare_path": {"type": "object",
                                      "required": ["throughput_fps", "frames", "latency_ms", "resources"],
                                      "properties": {"latency_ms": {
                                          "type": "object",
                                          "required": ["preprocess", "inference", "postprocess", "total"],
                                          "additionalProperties": SUMMARY}}},
                    },
                },
                "naive": {"type": "object", "required": ["throughput_fps", "frames", "latency_ms", "resources"]},
                "pipeline": {
                    "type": "object",
                    "required": ["setting", "search", "sweep", "unpaced"],
                    "properties": {
                        "search": {"type": "array", "items": PIPELINE_RUN},
                        "sweep": {"type": "array", "items": PIPELINE_RUN},
                        "unpaced": {"oneOf": [{"type": "null"}, PIPELINE_RUN]},
                    },
                },
                "e2e": {"allOf": [PIPELINE_RUN, {"required": ["e2e"]}]},
                "e2e_more": {"type": "array", "items": {"allOf": [PIPELINE_RUN, {"required": ["e2e"]}]}},
                "vlm": {
                    "type": "object",
                    "required": ["available", "reason", "time_to_first_token_ms", "tokens_per_s"],
                    "if": {"properties": {"available": {"const": True}}},
                    "then": {"required": ["bundle", "precision", "runs", "new_tokens", "vision_ms"],
                             "properties": {"time_to_first_token_ms": SUMMARY, "tokens_per_s": SUMMARY,
                                            "vision_ms": SUMMARY}},
                },
            },
            "additionalProperties": False,
        },
        "headline": {
            "type": "object",
            "required": [*HEADLINE_KEYS, "steady", "met", "shortfall"],
            "properties": {
                **{k: _NUM for k in HEADLINE_KEYS},
                "vlm_ttft_p50_ms": _NUM,
                "vlm_tokens_per_s_p50": _NUM,
                "met": {"type": "object", "additionalProperties": {"type": ["boolean", "null"]}},
                "steady": {"type": ["boolean", "null"]},
                "e2e_minus_inference_p99_ms_by_fraction": {"type": "object",
                                                           "additionalProperties": {"type": "number"}},
            },
        },
    },
}


def validate_results(results: dict[str, Any]) -> None:
    """Raise :class:`jsonschema.ValidationError` if ``results`` does not fit the schema."""
    jsonschema.validate(results, RESULTS_SCHEMA)

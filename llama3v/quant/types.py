"""The quantization types llama3v offers: the one table, names to gguf-py's enums.

The CLI builds its parser from these names, the converter and the quantizers map them here.
"""

from gguf import GGMLQuantizationType, LlamaFileType

Q = GGMLQuantizationType

# mmproj types, largest first: each loads in libmtmd and has an NMSE bound (docs/fidelity.md). One
# k-quant per file, hence no _s/_m mixes. q3_k and q2_k are not offered: on a ViT-L-shaped tower
# their embedding error (NMSE 0.26 and 0.58) is 40% to 90% of the difference between two unrelated
# images (docs/quantization.md).
MMPROJ_TYPES: dict[str, GGMLQuantizationType] = {
    name: Q[name.upper()]
    for name in ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0")
}

# The LLM types `convert` writes itself; llama.cpp's quantizer (quant/llm.py) makes the others from
# them, with per-tensor mixes (q4_k_m etc.) that beat one type for all.
CONVERT_LLM_TYPES: dict[str, GGMLQuantizationType] = {name: Q[name.upper()] for name in ("f32", "f16", "bf16", "q8_0")}

# llama-quantize's types (tools/quantize/quantize.cpp) as it spells them, lowercased, with llama.cpp's
# file type numbers. Left out: those that need an importance matrix (iq1_*, iq2_*, iq3_xxs, iq3_xs,
# q2_k_s), the ternary tq1_0/tq2_0 (for models trained ternary), mxfp4_moe (mixture-of-experts),
# q1_0/q2_0, and the aliases q3_k/q4_k/q5_k.
LLM_QUANT_TYPES: dict[str, LlamaFileType] = {
    name: LlamaFileType["ALL_F32" if name == "f32" else f"MOSTLY_{name.upper()}"]
    for name in ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s",
                 "q4_1", "q4_0", "iq4_nl", "iq4_xs", "q3_k_l", "q3_k_m", "q3_k_s", "iq3_m", "iq3_s", "q2_k")
}

# What `quant-report` measures when not told: a small cross product that shows both sides.
REPORT_MMPROJ_TYPES = ("f32", "f16", "q8_0", "q4_k")
REPORT_MODEL_TYPES = ("f32", "q8_0", "q4_k_m")

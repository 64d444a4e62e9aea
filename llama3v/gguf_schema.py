"""GGUF keys and tensor names llama3v writes and reads: llama.cpp's own names, plus ours under llama3v.*.

The converter writes these and the runtime validates them; both import them from here so that a
name lives in one place. Names and types follow llama.cpp's tools/mtmd/clip-impl.h and gguf-py.
"""

from gguf import GGUFValueType

# --- mmproj: libmtmd's keys -------------------------------------------------------------------
CLIP_ARCH = "clip"
HAS_VISION_ENCODER = "clip.has_vision_encoder"
PROJECTOR_TYPE = "clip.projector_type"
USE_GELU = "clip.use_gelu"
USE_SILU = "clip.use_silu"
IMAGE_SIZE = "clip.vision.image_size"
PATCH_SIZE = "clip.vision.patch_size"
EMBEDDING_LENGTH = "clip.vision.embedding_length"
FEED_FORWARD_LENGTH = "clip.vision.feed_forward_length"
BLOCK_COUNT = "clip.vision.block_count"
PROJECTION_DIM = "clip.vision.projection_dim"
HEAD_COUNT = "clip.vision.attention.head_count"
LAYER_NORM_EPS = "clip.vision.attention.layer_norm_epsilon"
IMAGE_MEAN = "clip.vision.image_mean"
IMAGE_STD = "clip.vision.image_std"
FEATURE_LAYER = "clip.vision.feature_layer"
GRID_PINPOINTS = "clip.vision.image_grid_pinpoints"
PATCH_MERGE_TYPE = "clip.vision.mm_patch_merge_type"

# libmtmd reads these with a fixed type and aborts the process on any other (DESIGN.md), so the
# runtime checks them before libmtmd sees a file.
MMPROJ_REQUIRED: dict[str, GGUFValueType] = {
    HAS_VISION_ENCODER: GGUFValueType.BOOL,
    PROJECTOR_TYPE: GGUFValueType.STRING,
    IMAGE_SIZE: GGUFValueType.UINT32,
    PATCH_SIZE: GGUFValueType.UINT32,
    EMBEDDING_LENGTH: GGUFValueType.UINT32,
    FEED_FORWARD_LENGTH: GGUFValueType.UINT32,
    BLOCK_COUNT: GGUFValueType.UINT32,
    PROJECTION_DIM: GGUFValueType.UINT32,
    HEAD_COUNT: GGUFValueType.UINT32,
    LAYER_NORM_EPS: GGUFValueType.FLOAT32,
    IMAGE_MEAN: GGUFValueType.ARRAY,
    IMAGE_STD: GGUFValueType.ARRAY,
}
MMPROJ_OPTIONAL: dict[str, GGUFValueType] = {
    USE_GELU: GGUFValueType.BOOL,
    USE_SILU: GGUFValueType.BOOL,
    FEATURE_LAYER: GGUFValueType.ARRAY,
    GRID_PINPOINTS: GGUFValueType.ARRAY,
    PATCH_MERGE_TYPE: GGUFValueType.STRING,
}
# The only projector graph llama3v produces; libmtmd calls the LLaVA MLP projector "mlp".
PROJECTOR_MLP = "mlp"

# --- mmproj: llama3v's own keys (upstream ignores them) ----------------------------------------
PREPROCESS_MODE = "llama3v.preprocess.mode"  # resize | squash | pad: single-tile mode (docs/formats.md)
PROJECTOR_KIND = "llama3v.projector.kind"  # mlp2x_gelu | linear: what the checkpoint had
SOURCE_FEATURE_LAYER = "llama3v.vision.hf_feature_layer"  # the checkpoint's own index (-2 etc.)
KEPT_PRECISION = "llama3v.quant.kept_precision"  # tensors the quantizer left in high precision
S2_SCALES = "llama3v.s2.scales"  # i32[]: multi-scale (S2) image sizes, smallest = the tower's (docs/s2.md)

# --- mmproj tensor names ------------------------------------------------------------------------
CLASS_EMBD = "v.class_embd"
PATCH_EMBD = "v.patch_embd.weight"
PATCH_BIAS = "v.patch_embd.bias"
POSITION_EMBD = "v.position_embd.weight"
IMAGE_NEWLINE = "v.image_newline"  # LLaVA-NeXT's row separator; libmtmd loads it for LLaVA but does not use it
PRE_LN = "v.pre_ln.{}"
VISION_BLOCK = "v.blk.{bid}.{part}.{kind}"  # part: attn_q attn_k attn_v attn_out ln1 ln2 ffn_up ffn_down
PROJ_LAYER = "mm.{idx}.{kind}"  # idx 0 and 2: the LLaVA MLP's two linear layers
S2_PROJ_LAYER = "s2.mm.{idx}.{kind}"  # an S2 checkpoint's projector, run by the runtime after merging scales

# --- LLM (llama architecture) -------------------------------------------------------------------
LLM_ARCH = "llama"
TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"
OUTPUT_NORM = "output_norm.weight"
ROPE_FREQS = "rope_freqs.weight"
LLM_BLOCK = "blk.{bid}.{part}.weight"  # attn_norm attn_q attn_k attn_v attn_output ffn_norm ffn_gate ffn_up ffn_down
EMBEDDING_LENGTH_LLM = "llama.embedding_length"
CHAT_TEMPLATE = "tokenizer.chat_template"
CHAT_FORMAT = "llama3v.chat.format"  # which format the template is: a name (chat_formats.py) or its source
TOKENIZER_MODEL = "tokenizer.ggml.model"
TOKENS = "tokenizer.ggml.tokens"
TOKEN_TYPES = "tokenizer.ggml.token_type"
MERGES = "tokenizer.ggml.merges"
BOS_ID = "tokenizer.ggml.bos_token_id"
EOS_ID = "tokenizer.ggml.eos_token_id"

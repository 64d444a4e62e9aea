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

# libmtmd reads these with a fixed type and aborts the process on any other (docs/security.md), so the
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
MAX_BLOCKS_VISION = 512  # far above any real tower; bounds the tensor checks of a crafted block_count
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
VISION_BLOCK = "v.blk.{bid}.{part}.{kind}"  # part: one of the names below; kind: weight or bias
# The parts of a vision block, as libmtmd names them (tools/mtmd/clip-impl.h).
ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT = "attn_q", "attn_k", "attn_v", "attn_out"
LN1, LN2 = "ln1", "ln2"
FFN_UP, FFN_DOWN = "ffn_up", "ffn_down"
VISION_ATTN_PARTS = (ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT)
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
# llama.cpp reads these hyperparameters of a llama model; some of its checks of them are asserts that abort.
CONTEXT_LENGTH_LLM = "llama.context_length"
BLOCK_COUNT_LLM = "llama.block_count"
FEED_FORWARD_LENGTH_LLM = "llama.feed_forward_length"
HEAD_COUNT_LLM = "llama.attention.head_count"
HEAD_COUNT_KV_LLM = "llama.attention.head_count_kv"
KEY_LENGTH_LLM = "llama.attention.key_length"
VALUE_LENGTH_LLM = "llama.attention.value_length"
ROPE_DIMENSION_COUNT = "llama.rope.dimension_count"
ROPE_SCALING_TYPE = "llama.rope.scaling.type"
# Floats that must be finite and positive (a NaN or negative epsilon aborts or hangs llama.cpp), with their bounds.
POSITIVE_FLOATS_LLM = {"llama.attention.layer_norm_rms_epsilon": 1.0, "llama.rope.freq_base": 1e12,
                       "llama.rope.scaling.factor": 1e6}
# Mixture-of-experts and multi-token-prediction keys: llama3v runs dense llama models, which have neither.
ABSENT_FEATURES_LLM = ("llama.expert_count", "llama.expert_used_count", "llama.expert_group_count",
                       "llama.expert_group_used_count", "llama.nextn_predict_layers")
# The names llama.cpp knows (LLAMA_ROPE_SCALING_TYPES in llama-model.cpp); any other aborts the process.
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
MAX_LAYERS_LLM = 512  # llama.cpp's LLAMA_MAX_LAYERS: more aborts the process
CHAT_TEMPLATE = "tokenizer.chat_template"
CHAT_FORMAT = "llama3v.chat.format"  # which format the template is: a name (chat_formats.py) or its source
TOKENIZER_MODEL = "tokenizer.ggml.model"
TOKENS = "tokenizer.ggml.tokens"
TOKEN_TYPES = "tokenizer.ggml.token_type"
MERGES = "tokenizer.ggml.merges"
BOS_ID = "tokenizer.ggml.bos_token_id"
EOS_ID = "tokenizer.ggml.eos_token_id"

# --- Llama-3.2-Vision (mllama): the model GGUF (architecture "mllama"; Ollama's libllama patch's names) ---
MLLAMA_LLM_ARCH = "mllama"
MLLAMA_CROSS_ATTENTION_LAYERS = "mllama.attention.cross_attention_layers"  # i32 array
MLLAMA_IMAGE_TOKEN_ID = "llama3v.mllama.image_token_id"  # u32: <|image|>'s id (= vocab_size in Meta's models)
# Cross-attention layers: LLM_BLOCK with part cross_attn_{q,k,v,o}_proj or cross_attn_{q,k}_norm, and
MLLAMA_CROSS_GATE = "blk.{bid}.{part}"  # part: cross_attn_attn_gate, cross_attn_mlp_gate; raw values, shape [1]

# --- Llama-3.2-Vision (mllama): the mmproj (projector type "mllama"; docs/formats.md) -----------------
MLLAMA_PROJECTOR_TYPE = "mllama"
MLLAMA_PREPROCESS_MODE = "mllama"  # llama3v.preprocess.mode: canvas, bilinear resize, pad, tile split
MLLAMA_MAX_NUM_TILES = "llama3v.mllama.max_num_tiles"  # u32
MLLAMA_ASPECT_RATIOS = "llama3v.mllama.aspect_ratios"  # i32 array: rows, cols of each grid by id (id = index + 1)
MLLAMA_GLOBAL_BLOCK_COUNT = "llama3v.mllama.global_block_count"  # u32
MLLAMA_INTERMEDIATE_LAYERS = "llama3v.mllama.intermediate_layers"  # i32 array: local layers appended to the output
MLLAMA_OUTER_LN_EPS = "llama3v.mllama.outer_layer_norm_epsilon"  # f32: eps of v.pre_ln and v.post_ln
MLLAMA_GATES_PRECOMPUTED = "llama3v.mllama.gates_tanh"  # bool: every v.* gate holds tanh(gate) (position: 1 - tanh)

MLLAMA_TILE_POSITION_EMBD = "v.tile_position_embd.weight"  # [n_grids + 1, max_tiles * n_positions * n_embd]
MLLAMA_TILE_POSITION_GATE = "v.tile_position_embd.gate"  # tanh(gate)
MLLAMA_POSITION_GATE = "v.position_embd.gate"  # 1 - tanh(gate)
MLLAMA_PRE_TILE_EMBD = "v.pre_tile_position_embd.weight"  # [n_grids + 1, max_tiles * n_embd]
MLLAMA_PRE_TILE_GATE = "v.pre_tile_position_embd.gate"
MLLAMA_POST_TILE_EMBD = "v.post_tile_position_embd.weight"
MLLAMA_POST_TILE_GATE = "v.post_tile_position_embd.gate"
MLLAMA_POST_LN = "v.post_ln.{}"
MLLAMA_GLOBAL_BLOCK = "v.global.blk.{bid}.{part}.{kind}"  # as v.blk.N plus the gates below
MLLAMA_GLOBAL_GATE = "v.global.blk.{bid}.{part}"  # part: attn_gate, ffn_gate; tanh(gate)
MLLAMA_PROJECTOR = "mm.0.{}"  # the linear projector: weight [n_embd_text, vision_output_dim], bias

# The quickstart's instruct model (make demo): trained from scratch on the offline demo corpus
# (tinystories.py make_demo; train_vocab --vocab_size=1024 --include_prompts;
# prepare_instruct_data.py --vocab_size=1024 --max_seq_len=192).
# The 2-core CPU: 1500 iterations in about 5 minutes; it then uses all three requested words in
# 97-98% of stories for held-out word triples (docs/benchmarks.md, "Quickstart").
dataset = "instruct"
data_dir = "data"
vocab_source = "custom"
vocab_size = 1024
dim = 128
n_layers = 4
n_heads = 4
n_kv_heads = 4
multiple_of = 32
max_seq_len = 192
batch_size = 16
gradient_accumulation_steps = 1
learning_rate = 3e-3
max_iters = 1500
warmup_iters = 50
eval_interval = 500
eval_iters = 5
log_interval = 50
out_dir = "out/demo/instruct"
# this small model is overhead-bound on a CPU: float32 eager measured faster than bfloat16
# autocast, and compiling costs about a minute on 2 cores
dtype = "float32"
compile = False

"""Classic small LSTM on the Penn Treebank (Zaremba, Sutskever & Vinyals 2014, "small"
non-regularized model): 2 layers of 200 units, unrolled 35 steps, batch 20, plain SGD at
learning rate 1.0 halved every epoch after the 4th, gradient norm clipped at 5, 13 epochs,
all weights uniform in [-0.1, 0.1], no dropout, untied output layer.

What it is for: a recurrent baseline on the standard word-level benchmark, trained with
the same loop, checkpoints and evaluation as the Transformers.
Data: PTB is not shipped and nothing downloads it. Point data.paths / data.heldout_paths
at your copy of the Mikolov preprocessed files (ptb.train.txt, ptb.valid.txt; 10k word
vocabulary, one sentence per line), e.g.
    lmjax train experiments/lstm_ptb.py --config.data.paths=/data/ptb/ptb.train.txt \
        --config.data.heldout_paths=/data/ptb/ptb.valid.txt
Each line (sentence) is a document; the end-of-text token that ends each document plays
PTB's <eos>, and the held-out file is evaluated as one stream (data.stream), as in the paper.
What it reaches: the paper reports 120.7 validation / 114.5 test perplexity. Not yet run
here (no PTB on this machine). Expect somewhat worse: batches here are windows sampled at
random with a fresh zero state, where the paper carries the state across consecutive
batches.
"""

from lmjax.config import base_config

STEPS_PER_EPOCH = 1327  # ~929k training words / (20 x 35)


def get_config():
    c = base_config()
    c.data.source = "files"
    c.data.paths = "data/ptb/ptb.train.txt"  # placeholder: point at PTB on disk
    c.data.heldout_paths = "data/ptb/ptb.valid.txt"
    c.data.split_by = "line"
    c.data.stream = True
    c.data.seq_len = 35
    c.tokenizer.kind = "word"
    c.tokenizer.vocab_size = 0  # every training word: PTB is already cut to 10k (with <unk>)

    c.model.kind = "lstm"
    c.model.d_model = 200
    c.model.n_layers = 2
    c.model.dropout = 0.0
    c.model.tie_embeddings = False

    c.optim.name = "sgd"
    c.optim.lr = 1.0
    c.optim.momentum = 0.0
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 5.0
    c.optim.warmup_steps = 0
    c.optim.schedule = "step"
    c.optim.decay_factor = 0.5
    c.optim.decay_start = 4 * STEPS_PER_EPOCH
    c.optim.decay_every = STEPS_PER_EPOCH

    c.train.steps = 13 * STEPS_PER_EPOCH
    c.train.batch_size = 20
    c.train.log_every = 100
    c.train.eval_every = STEPS_PER_EPOCH
    c.train.save_every = STEPS_PER_EPOCH
    c.train.eval_batches = 20
    c.eval.batch_size = 20
    return c

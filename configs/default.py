"""The default experiment. Every field is documented here; other configs start from this one.

`python main.py` runs it: erase "circle" from the shipped shapes-world model with ESD-u (the paper's
convention), measure original vs erased with the shipped classifier, export the erased pipeline.
"""

import ml_collections

from esd_jax.shapes_world import world


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # A diffusers pipeline folder, a Hub repo id, a single-file CompVis checkpoint (.safetensors / .ckpt),
  # "shapes-world" (the small trained model shipped in esd_jax/shapes_world/assets/shapes_world, see README), or
  # "tiny-random" (a small random SD 1.x-structured pipeline, built on first use under workdir).
  config.model = 'shapes-world'
  config.variant = ''  # weights variant of a diffusers folder, e.g. "fp16"; empty for the default files
  config.tokenizer = ''  # single files only: a CLIPTokenizer folder, when the file carries none
  config.prediction_type = ''  # single files only: 'epsilon' | 'v_prediction' for SD2 files we did not write
  # How attention runs (esd_jax/models/attention.py): auto (the backend's fastest: splash on TPU, cuDNN on GPU in
  # bfloat16, chunked on CPU) | xla (the reference) | chunked (query blocks: no whole score matrix) | cudnn | splash
  config.attention = 'auto'
  config.workdir = 'outputs/default'  # every output of a run goes here; re-running resumes

  # What to erase and how (docs/method.md §1-3). The paper's settings, except η = 3 and the training length and rate
  # below, which the shapes-world recipe search chose (README); configs/sd14_*.py hold the paper's own.
  config.erase = ml_collections.ConfigDict()
  config.erase.concepts = ('circle',)  # one is drawn per iteration
  # Erase the concepts only from this prompt; '' for none (per concept: a concepts file); 'auto' on the shapes world:
  # each concept from every "a {colour} {shape}" prompt that names it.
  config.erase.erase_from = ''
  config.erase.concepts_file = ''  # text/CSV/JSON file of concepts (esd_jax/concepts.py), instead of the two above
  # Prompts the erasure must not change, each iteration one of them through a retain loss (docs/method.md §5): the
  # student's prediction on it kept to the frozen model's, weight preserve_weight. () for plain ESD; 'auto' on the
  # shapes world: its prompts that name none of the erased concepts.
  config.erase.preserve = ()
  config.erase.preserve_weight = 1.0
  # Robust erasure (AdvUnlearn, docs/method.md §9): each iteration first searches adversarial_steps Adam steps (rate
  # adversarial_learning_rate) for the perturbation of the concept prompt's word embeddings that best brings the
  # concept back under the model being trained, then trains on the perturbed prompt. 0 steps: plain ESD. One model,
  # SD 1.x/2.x; pair it with `preserve` (AdvUnlearn's utility term).
  config.erase.adversarial = False
  config.erase.adversarial_steps = 5
  config.erase.adversarial_learning_rate = 0.05
  # 0: the search moves the prompt's own words (AdvUnlearn's `add`; 0 steps is then plain ESD to the bit). k > 0: it
  # moves k tokens put after the start token, drawn at random from the vocabulary each iteration (AdvUnlearn's
  # `prefix_k`: the form of `attack`'s prompts).
  config.erase.adversarial_tokens = 0
  config.erase.separate_models = False  # True: one erased model per concept, trained together (batched)
  config.erase.method = 'esd-u'  # esd-x | esd-u | esd-x-strict | esd-self | esd-all | notime | xlayer |
  #                                selflayer (CompVis aliases xattn, noxattn, selfattn, full) | patterns
  config.erase.patterns = ()  # regexes over diffusers parameter names, for method 'patterns'
  config.erase.convention = 'paper'  # paper | diffusers-v1 | diffusers-v2 (how x_t is sampled, docs/method.md §2)
  config.erase.negative_guidance = 3.0  # η, in the paper's convention
  config.erase.guidance = 3.0  # guidance of the sampler that produces x_t
  config.erase.ddim_steps = 50
  config.erase.sampler = 'ddim'  # diffusers-v2 only: ddim | pndm
  config.erase.resolution = 0  # image size trained at; 0: the model's native size

  config.train = ml_collections.ConfigDict()
  config.train.iterations = 200  # separate models: a concepts file may give a model its own (and learning_rate)
  config.train.learning_rate = 5e-5
  config.train.batch_size = 1
  config.train.concepts_per_step = 1  # one model, several concepts: draws this many per step, averages losses
  # separate_models: every model takes model 0's sampler length and timestep each iteration (its own noise), so the
  # batched sampler pads no model to the longest trajectory (faster; models other than 0 then draw unlike a run alone)
  config.train.shared_timesteps = False
  config.train.seed = 0
  config.train.compute_dtype = 'float32'  # float32 | bfloat16 (parameters and Adam state stay float32)
  # Memory for compute: the student UNet's blocks recomputed in its backward pass (none | blocks: keep only each
  # block's input | dots: keep its matmul outputs too). Same numbers; `plan` shows what each saves.
  config.train.remat = 'none'
  # The dtype of the frozen base on the devices: auto (the compute dtype: with bfloat16 compute no number changes, as
  # every layer casts its weights to bfloat16 anyway) | float32 | bfloat16 (with float32 compute the teacher then
  # reads rounded weights). Below float32 the trained subset and Adam stay float32 and the float32 UNet waits in host
  # memory for the export.
  config.train.frozen_dtype = 'auto'
  config.train.checkpoint_every = 100

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.keep = 2  # checkpoints kept in workdir/checkpoints

  # Device mesh: `data` splits the batch, `fsdp` splits parameters; -1 takes the remaining devices.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.concept = 1  # separate_models: devices the models are split over (divides the concept count)
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.min_shard_size = 2 ** 18  # tensors smaller than this (elements) are replicated
  # Several processes (the hosts of a TPU pod slice, or local processes; README "Running on several hosts"): every
  # process runs the same command. Empty / 0 / -1 leave the coordinator, process count and id to JAX's cluster
  # detection (Cloud TPU, SLURM, Open MPI) or its JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
  config.mesh.distributed = False  # True: jax.distributed.initialize() before anything else
  config.mesh.coordinator_address = ''  # host:port of process 0
  config.mesh.num_processes = 0
  config.mesh.process_id = -1
  config.mesh.initialization_timeout_s = 300  # how long a process waits for the others to start
  config.mesh.heartbeat_timeout_s = 100  # a process silent this long counts as lost: the others stop with an error

  # The erased model: `erase` writes export.formats to workdir/erased; `export` writes them to workdir/export
  # for any ESD weights file (export.weights), `compare` renders original vs erased with the generate settings.
  config.export = ml_collections.ConfigDict()
  config.export.formats = ('diffusers', 'trained')  # trained | unet | diffusers | single_file (see convert/erased.py)
  config.export.dtype = 'fp32'  # fp32 | fp16 | bf16
  config.export.weights = ''  # ESD weights (ours or the authors' .pt/.safetensors); '' = workdir's erasure

  config.generate = ml_collections.ConfigDict()
  config.generate.prompts = tuple(f'a red {shape}' for shape in world.SHAPES)
  config.generate.negative_prompt = ''
  config.generate.seeds = (0, 1, 2, 3)
  config.generate.guidance_scale = 7.5
  config.generate.steps = 50
  config.generate.scheduler = 'ddim'  # ddim | pndm | config (the pipeline's own scheduler class)
  config.generate.eta = 0.0
  config.generate.height = 0  # 0: the model's native size
  config.generate.width = 0
  config.generate.dtype = 'float32'  # compute dtype: float32 | bfloat16 (parameters stay float32)

  # Measuring an erasure on the shapes world: after `erase`, the original and the erased model generate
  # evaluate.prompts × evaluate.seeds images (DDIM), the classifier names each one's shape and colour, and
  # workdir/report.json and workdir/erasure.png show the result. `evaluate` measures one model alone.
  config.evaluate = ml_collections.ConfigDict()
  config.evaluate.classifier = 'shapes-world'  # the shipped classifier, a classifier folder, or '' (no measuring)
  config.evaluate.prompts = world.PROMPTS  # the 16 "a {colour} {shape}" prompts
  config.evaluate.seeds = 16  # images per prompt (seeds 0…n-1); the acceptance numbers use 64
  config.evaluate.steps = 50
  config.evaluate.guidance_scale = 7.5
  config.evaluate.batch_size = 256
  config.evaluate.grid_seeds = 4  # seeds per model shown in the grid
  # `erase` only: a folder that keeps the original model's images (named by a fingerprint of its weights, prompts,
  # seeds and sampling), so a sweep of erasures of one model generates them once; '' for none.
  config.evaluate.original_cache = ''
  config.evaluate.backend = 'jax'  # `evaluate` only: jax | diffusers (PyTorch, a diffusers folder as it is)

  # `attack` (README "Is it really erased?", docs/method.md §9): searches, white-box, for prompts that bring each
  # erased model's concept back (UnlearnDiffAtk: `tokens` adversarial tokens after the start token, their embeddings
  # moved by Adam for `steps` steps at `learning_rate` toward `objective`, then projected to the nearest vocabulary
  # tokens), one attack per prompt × seed, all models in one search; the original model is attacked beside them.
  # Writes workdir/attack/report.json and grid.png. The models and attacks lie on the mesh of `mesh` as erase's do:
  # mesh.concept must divide the models attacked, mesh.data the attacks per model (prompts × seeds).
  config.attack = ml_collections.ConfigDict()
  config.attack.weights = ()  # ESD weights files attacked together; () = this workdir's erasure
  config.attack.concepts = ()  # each weights file's concept; () = the one its metadata names
  config.attack.prompts = ()  # prompts attacked; () = the shapes world's prompts naming the concept
  config.attack.seeds = 8  # attacks per prompt, from evaluate's seeds 0…n-1
  config.attack.steps = 20
  config.attack.tokens = 3
  config.attack.learning_rate = 0.05
  # What the search lowers: 'classifier' (the judge's −log p(concept) on the attacked model's own images, drawn with
  # search_steps DDIM steps and differentiated through sampler and VAE; needs attack.classifier) | 'denoise'
  # (UnlearnDiffAtk's: the attacked model's denoising loss on the original model's image; any model)
  config.attack.objective = 'classifier'
  config.attack.search_steps = 5
  config.attack.seed = 0  # the search's random draws (initial tokens, timesteps, noise)
  # The search saves its state (workdir/attack/search.safetensors) every this many steps, so that a rerun of the
  # same attack resumes there instead of searching again: each save costs a host copy of the state.
  config.attack.checkpoint_every = 10
  config.attack.sample_steps = 50  # DDIM steps of every image drawn (targets, attacks, probes)
  config.attack.guidance_scale = 7.5
  config.attack.classifier = 'shapes-world'  # judges the images (success, probes); '' = search and grid only
  # The probes of shallow erasure (need the classifier): the original model's trajectory handed to the erased model
  # at these DDIM steps, the erased model under these guidance scales, and the concept in other prompt forms
  # (() = shallow.default_forms).
  config.attack.handoff = (0, 10, 20, 30, 40)
  config.attack.guidance = (7.5, 15.0, 30.0)
  config.attack.forms = ()
  config.attack.grid_seeds = 2  # seeds per prompt shown in grid.png

  # Erase until (README "Erasing any concept"): every probe.every iterations (0: never) the run measures its model on
  # a small probe and stops once the erased concept is shown in ≤ max_shown of the probe's images with no other
  # shape's or colour's accuracy down by more than max_drop; train.iterations is then the most it runs, and a run
  # that never meets them exports the best model it measured (shown + worst drop, lowest). The probe is the shapes
  # world's (evaluate.classifier judges seeds 1000…, never the evaluation's).
  config.probe = ml_collections.ConfigDict()
  config.probe.every = 0
  config.probe.seeds = 8  # images per prompt of the world's 16, in one jitted batch
  config.probe.steps = 25  # DDIM steps
  config.probe.guidance_scale = 7.5
  config.probe.max_shown = 0.05
  config.probe.max_drop = 0.03
  # > 0: a reading that meets the criteria is confirmed on this many more seeds (all images pooled) before the run
  # stops, so that it does not stop on a lucky draw of the probe's few seeds.
  config.probe.confirm_seeds = 0
  # The confirmed (pooled) reading's DDIM steps and bound on the worst drop: steps' and max_drop's unless set
  # (references derived from them, so that setting these leaves those alone).
  config.probe.confirm_steps = config.probe.get_ref('steps') * 1
  config.probe.confirm_max_drop = config.probe.get_ref('max_drop') * 1.0
  # From the first reading that finds the concept gone (shown ≤ max_shown) while the others are not yet within
  # max_drop, the learning rate and the retain loss's λ are multiplied by these: the run shifts from erasing to
  # repairing what the erasure broke (1, 1: no change).
  config.probe.settle_learning_rate = 1.0
  config.probe.settle_preserve_weight = 1.0

  # `plan`: compiles the erase step of this config from abstract parameters (no weights; the reference names
  # sd-v1-4, sd-v2-1, sdxl-base-1.0 work) and prints its memory per device, FLOPs and collectives.
  config.plan = ml_collections.ConfigDict()
  config.plan.devices = 0  # > 0: that many emulated CPU devices stand for the chips (plan alone); 0: the devices there are
  config.plan.json = ''  # also write the numbers to this JSON file

  # `serve`: the web app (README "Web app"): erase, test and download models in a browser, on config.model, with the
  # other sections as the forms' defaults. Runs go to workdir/runs/NAME (each a workdir of its own, resumable),
  # imported ESD weights to workdir/imported. There is no authentication: whoever reaches host:port can train, run
  # the models and read and write under workdir, so keep the loopback address unless the network is yours alone.
  config.serve = ml_collections.ConfigDict()
  config.serve.host = '127.0.0.1'  # 0.0.0.0 listens on every interface (exposes the app: see above)
  config.serve.port = 7860
  config.serve.max_upload_mb = 8192  # largest weights file the Models tab imports (SD 1.4's full-UNet .pt: 3.4 GB)
  return config

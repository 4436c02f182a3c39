//! The `edgelorad` command line.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use edgelora_kernels::cpu::kv::{KvDtype, KvPool};
use edgelora_kernels::cpu::lora::AdapterBits;

use crate::adapters::LoraAdapter;
use crate::device::{Device, DeviceSpec};
use crate::engine::cuda::CudaBackend;
use crate::engine::forward::ActMode;
use crate::engine::generate::{GenerateParams, all_logits, generate};
use crate::engine::perplexity::{PerplexityParams, perplexity};
use crate::engine::sampler::SamplingParams;
use crate::engine::{Backend, ForwardOptions, SparseConfig};
use crate::model::chat::ChatMessage;
use crate::model::{LoadOptions, Model, WeightDtype};

#[derive(Parser, Debug)]
#[command(
    name = "edgelorad",
    version,
    about = "Many LoRA skills over one INT4 base model, on the edge"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text from a prompt, a chat message or token ids.
    Generate(GenerateArgs),
    /// Check a model: logits, perplexity.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Manage models.
    #[command(subcommand)]
    Model(ModelCommand),
    /// CUDA kernels.
    #[command(subcommand)]
    Kernels(KernelsCommand),
    /// Serve the OpenAI-compatible HTTP API (completions, chat, models) for the base model and
    /// every adapter in --adapters-dir.
    Serve(Box<crate::api::ServeArgs>),
    /// Manage adapter packs: import PEFT folders, list, show, remove.
    #[command(subcommand)]
    Adapters(AdaptersCommand),
    /// The attribution ledger: verify, inspect, counters, proofs.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// This appliance's fleet identity: certificate signing request, certificate install.
    #[command(subcommand)]
    Identity(crate::identity::IdentityCommand),
    /// A/B system updates from signed bundles: apply, status, mark-good.
    #[command(subcommand)]
    Update(crate::update::UpdateCommand),
}

#[derive(Args, Debug)]
pub struct LedgerDir {
    /// The appliance's data directory (the ledger is `<data>/ledger`; default as `serve`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

impl LedgerDir {
    fn dir(&self) -> PathBuf {
        self.data
            .clone()
            .unwrap_or_else(crate::adapters::registry::default_data_dir)
            .join("ledger")
    }
}

#[derive(Subcommand, Debug)]
pub enum LedgerCommand {
    /// Every frame's checksum, sequence continuity, the segment chain, the Merkle root at every
    /// checkpoint and every checkpoint signature; exits non-zero at the first bad frame.
    Verify(LedgerDir),
    /// Every frame of every segment, with its offset.
    Inspect(LedgerDir),
    /// Requests and tokens per contributor and kind, derived from the log.
    Counters(LedgerDir),
    /// An inclusion proof of one event against the latest signed checkpoint, checked.
    Proof {
        #[command(flatten)]
        d: LedgerDir,
        #[arg(long)]
        seq: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum KernelsCommand {
    /// Compile every CUDA kernel to PTX ahead of time (needs NVRTC here, not on the box).
    Build {
        /// Target architectures, e.g. sm_87 (Jetson Orin), sm_80, sm_90.
        #[arg(long, value_delimiter = ',', default_values_t = edgelora_kernels::cuda::SHIPPED_ARCHS.iter().map(|s| s.to_string()))]
        arch: Vec<String>,
        /// Output folder (point $EDGELORA_KERNELS at it, or install it as /usr/lib/edgelora/kernels).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Write the logits at every prompt position (one forward, fresh cache) to a safetensors file.
    Logits(LogitsArgs),
    /// Perplexity over a text file by llama-perplexity's method.
    Perplexity(PerplexityArgs),
}

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Fetch the default model (SmolLM2-135M-Instruct Q4_1) into the cache and print its path.
    Fetch,
}

/// Who selects the pages under page sparsity (`--sparse-select`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SparseSelect {
    /// Each query head selects its own pages.
    #[default]
    Head,
    /// The query heads of a GQA group share one selection.
    Group,
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face folder, a GPTQ folder or a GGUF file (default: SmolLM2-135M-Instruct Q4_1,
    /// fetched on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A PEFT LoRA adapter folder, or a pack file made by `edgelorad adapters import`.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Projection weights: int4 (quantized at load) or f32 (full precision, for checking).
    #[arg(long, default_value = "int4")]
    pub dtype: WeightDtype,
    /// INT4 group size for quantize-at-load (a multiple of 32).
    #[arg(long, default_value_t = 32)]
    pub group_size: usize,
    /// KV cache element type: f32, f16 or int4.
    #[arg(long, default_value = "f32")]
    pub kv: KvDtype,
    /// Tokens per KV page.
    #[arg(long, default_value_t = 16)]
    pub page_size: usize,
    /// Attend only to the most relevant pages once the context exceeds this many tokens.
    #[arg(long)]
    pub sparse_budget: Option<usize>,
    /// Under --sparse-budget, the newest pages always attended (a local window), within the budget.
    #[arg(long, default_value_t = 4)]
    pub sparse_recent: usize,
    /// Under --sparse-budget, who selects pages: each query head (`head`), or the query heads of a
    /// GQA group together (`group`: one read of the budget serves the whole group).
    #[arg(long, value_enum, default_value = "head")]
    pub sparse_select: SparseSelect,
    /// Activations against quantized weights: int8 (fast, as llama.cpp) or f32 (exact reference).
    #[arg(long, default_value = "int8")]
    pub act: ActMode,
    /// Adapters' A and B on the int8 path: 8 bits, or 4 (0.57 of the bytes a batch of distinct
    /// adapters reads per step, moving each adapter's effect on the logits by 10-14% against
    /// under 1% at 8 bits; see BENCHMARKS.md).
    #[arg(long, default_value = "8")]
    pub adapter_bits: AdapterBits,
    /// Compute threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Compute device: auto (CUDA when a GPU answers, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Raw prompt text (special tokens added as the model does).
    #[arg(long, conflicts_with_all = ["chat", "prompt_tokens"])]
    pub prompt: Option<String>,
    /// A user message rendered through the model's chat template.
    #[arg(long, conflicts_with = "prompt_tokens")]
    pub chat: Option<String>,
    /// A system message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    pub prompt_tokens: Option<Vec<u32>>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Recompute the whole sequence every step instead of using the KV cache (for checking).
    #[arg(long)]
    pub no_kv_cache: bool,
    /// Prompt tokens per prefill forward.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Print one JSON object: prompt ids, generated ids, text, and with --logits-out the logits file.
    #[arg(long)]
    pub json: bool,
    /// Print prompt and generation speed to stderr.
    #[arg(long)]
    pub stats: bool,
    /// Also write the logits each token was chosen from ([n, vocab] f32 `logits`) to this file.
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    #[arg(long, value_delimiter = ',', required = true)]
    pub prompt_tokens: Vec<u32>,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// The text file to score.
    #[arg(long)]
    pub text: PathBuf,
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Score at most this many windows.
    #[arg(long)]
    pub chunks: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

pub(crate) struct Loaded {
    pub(crate) model: Model,
    pub(crate) adapter: Option<LoraAdapter>,
    pub(crate) opts: ForwardOptions,
}

impl ModelArgs {
    pub(crate) fn load(&self) -> Result<Loaded> {
        let path = match &self.model {
            Some(p) => p.clone(),
            None => crate::default_model::ensure()
                .map_err(anyhow::Error::msg)
                .context("fetching the default model")?,
        };
        if let Some(t) = self.threads {
            edgelora_kernels::cpu::threads::set_threads(t);
        }
        let t0 = std::time::Instant::now();
        let model = Model::load(
            &path,
            &LoadOptions {
                dtype: self.dtype,
                group_size: self.group_size,
                // Exact activations check against float32 references: keep the head f32 too.
                q8_embeddings: self.act == ActMode::Int8,
            },
        )
        .with_context(|| format!("loading {}", path.display()))?;
        tracing::info!(
            model = %path.display(),
            arch = model.config.arch.name(),
            layers = model.config.n_layers,
            weight_mb = model.weights.bytes_per_token() as f64 / 1e6,
            secs = t0.elapsed().as_secs_f64(),
            "model loaded"
        );
        let adapter = match &self.adapter {
            // An imported pack (checked against this model like the server does) ...
            Some(p) if p.is_file() => {
                let fp = crate::adapters::pack::fingerprint(&model.config);
                let info = crate::adapters::pack::read_info(p, &fp)?;
                let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                Some(crate::adapters::pack::decode_with(
                    &info,
                    &bytes,
                    &model.config,
                    self.adapter_bits,
                )?)
            }
            // ... or a PEFT folder.
            Some(dir) => Some(LoraAdapter::load_peft_with(
                dir,
                &model.config,
                self.adapter_bits,
            )?),
            None => None,
        };
        if self.page_size == 0 {
            bail!("--page-size must be at least 1");
        }
        Ok(Loaded {
            model,
            adapter,
            opts: ForwardOptions {
                sparse: self.sparse(),
                act: self.act,
            },
        })
    }

    /// The page-sparsity settings of `--sparse-budget`, `--sparse-recent` and `--sparse-select`.
    fn sparse(&self) -> Option<SparseConfig> {
        self.sparse_budget.map(|b| SparseConfig {
            budget_tokens: b,
            recent_pages: self.sparse_recent,
            group_shared: self.sparse_select == SparseSelect::Group,
        })
    }

    /// The step backend on the chosen device, with KV pages for `tokens` tokens.
    pub(crate) fn backend(&self, model: &Model, tokens: usize) -> Result<Box<dyn Backend>> {
        Ok(self.backend_why(model, tokens)?.0)
    }

    /// The backend and why its device was chosen (`--device auto` explains itself).
    pub(crate) fn backend_why(
        &self,
        model: &Model,
        tokens: usize,
    ) -> Result<(Box<dyn Backend>, String)> {
        let device = crate::device::open(self.device)?;
        let why = device.why().to_string();
        let backend: Box<dyn Backend> = match device {
            Device::Cpu { .. } => Box::new(self.pool(model, tokens)?),
            Device::Cuda { gpu, .. } => {
                if self.adapter_bits != AdapterBits::Int8 {
                    tracing::warn!(
                        adapter_bits = %self.adapter_bits,
                        "--adapter-bits applies to the CPU's int8 path; the CUDA backend keeps \
                         adapters in its own form"
                    );
                }
                let pages = tokens.div_ceil(self.page_size) + 1;
                Box::new(CudaBackend::new(
                    gpu,
                    model,
                    self.kv,
                    self.page_size,
                    pages,
                )?)
            }
        };
        Ok((backend, why))
    }

    fn pool(&self, model: &Model, tokens: usize) -> Result<KvPool> {
        let c = &model.config;
        let geom = c.kv_geometry(self.page_size);
        Ok(KvPool::new(
            geom,
            self.kv,
            tokens.div_ceil(self.page_size) + 1,
        )?)
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => cmd_generate(a),
        Command::Serve(a) => crate::api::serve(*a),
        Command::Eval(EvalCommand::Logits(a)) => cmd_logits(a),
        Command::Eval(EvalCommand::Perplexity(a)) => cmd_perplexity(a),
        Command::Kernels(KernelsCommand::Build { arch, out }) => {
            let written = crate::device::build_all(&arch, &out)?;
            for p in &written {
                println!("{}", p.display());
            }
            eprintln!(
                "compiled {} kernel modules for {} into {}",
                written.len() / arch.len().max(1),
                arch.join(", "),
                out.display()
            );
            Ok(())
        }
        Command::Adapters(a) => cmd_adapters(a),
        Command::Ledger(l) => cmd_ledger(l),
        Command::Identity(c) => {
            crate::identity::run(c, crate::adapters::registry::default_data_dir)
        }
        Command::Update(c) => crate::update::run(c),
        Command::Model(ModelCommand::Fetch) => {
            let p = crate::default_model::ensure().map_err(anyhow::Error::msg)?;
            println!("{}", p.display());
            Ok(())
        }
    }
}

fn write_logits(path: &Path, rows: usize, vocab: usize, data: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![rows, vocab], &bytes)?;
    safetensors::serialize_to_file([("logits", view)], None, path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let l = a.m.load()?;
    let tok = &l.model.tokenizer;
    let prompt: Vec<u32> = if let Some(ids) = &a.prompt_tokens {
        ids.clone()
    } else if let Some(text) = &a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage {
                role: "system".into(),
                content: s.clone(),
            });
        }
        msgs.push(ChatMessage {
            role: "user".into(),
            content: text.clone(),
        });
        tok.encode_chat(&msgs)?
    } else if let Some(text) = &a.prompt {
        tok.encode(text, true)?
    } else {
        bail!("give one of --prompt, --chat or --prompt-tokens");
    };
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
    };
    sampling.validate()?;
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        sampling,
        stop_ids: if a.ignore_eos {
            Vec::new()
        } else {
            tok.eos_ids.clone()
        },
        use_cache: !a.no_kv_cache,
        prefill_chunk: a.prefill_chunk.max(1),
        keep_logits: a.logits_out.is_some(),
    };
    let mut backend = a.m.backend(&l.model, prompt.len() + a.max_tokens)?;
    let stream = !a.json;
    let mut printed = 0usize;
    let mut so_far: Vec<u32> = Vec::new();
    let gen_out = generate(
        &l.model,
        &mut *backend,
        l.adapter.as_ref(),
        &prompt,
        &params,
        &l.opts,
        |t| {
            if stream {
                // Print the text that became stable (decoding can merge bytes across tokens).
                so_far.push(t);
                if let Ok(text) = tok.decode(&so_far, true)
                    && !text.ends_with('\u{FFFD}')
                    && text.len() > printed
                {
                    print!("{}", &text[printed..]);
                    let _ = std::io::stdout().flush();
                    printed = text.len();
                }
            }
        },
    )?;
    let text = tok.decode(&gen_out.tokens, true)?;
    if a.stats {
        let n = gen_out.tokens.len();
        // The first generated token comes from the prefill's logits.
        let decoded = n.saturating_sub(1).max(1);
        eprintln!(
            "prompt: {} tokens in {:.1} ms ({:.1} tokens/s); generated: {n} tokens, {:.1} tokens/s ({} threads, {})",
            prompt.len(),
            gen_out.prefill_secs * 1e3,
            prompt.len() as f64 / gen_out.prefill_secs.max(1e-9),
            decoded as f64 / gen_out.decode_secs.max(1e-9),
            edgelora_kernels::cpu::threads::global().threads(),
            match backend.describe().as_str() {
                "cpu" => edgelora_kernels::cpu::qdot::best_isa().name().to_string(),
                other => other.to_string(),
            },
        );
    }
    if let Some(p) = &a.logits_out {
        let vocab = l.model.config.vocab_size;
        let flat: Vec<f32> = gen_out.logits.iter().flatten().copied().collect();
        write_logits(p, gen_out.logits.len(), vocab, &flat)?;
    }
    if a.json {
        let v = serde_json::json!({
            "prompt_token_ids": prompt,
            "token_ids": gen_out.tokens,
            "text": text,
            "finish_reason": gen_out.finish.as_str(),
        });
        println!("{v}");
    } else {
        if text.len() > printed {
            print!("{}", &text[printed..]);
        }
        println!();
    }
    Ok(())
}

fn cmd_logits(a: LogitsArgs) -> Result<()> {
    let l = a.m.load()?;
    let mut backend = a.m.backend(&l.model, a.prompt_tokens.len())?;
    let logits = all_logits(
        &l.model,
        &mut *backend,
        l.adapter.as_ref(),
        &a.prompt_tokens,
        &l.opts,
    )?;
    write_logits(
        &a.out,
        a.prompt_tokens.len(),
        l.model.config.vocab_size,
        &logits,
    )?;
    eprintln!(
        "wrote logits [{}, {}] to {}",
        a.prompt_tokens.len(),
        l.model.config.vocab_size,
        a.out.display()
    );
    Ok(())
}

fn cmd_perplexity(a: PerplexityArgs) -> Result<()> {
    let l = a.m.load()?;
    let text = std::fs::read_to_string(&a.text)
        .with_context(|| format!("reading {}", a.text.display()))?;
    let tok = &l.model.tokenizer;
    let tokens = tok.encode(&text, true)?;
    // llama-perplexity puts BOS at the start of every window only when the model adds BOS.
    let bos = if tok.adds_bos() { tok.bos_id } else { None };
    let mut backend = a.m.backend(&l.model, a.ctx)?;
    let t0 = std::time::Instant::now();
    let params = PerplexityParams {
        ctx: a.ctx,
        max_chunks: a.chunks,
        bos,
    };
    let report = perplexity(
        &l.model,
        &mut *backend,
        &tokens,
        params,
        &l.opts,
        |i, n, ppl| {
            eprintln!("[{i}/{n}] running perplexity {ppl:.4}");
        },
    )?;
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"ppl": report.ppl, "ctx": report.ctx, "chunks": report.chunks,
                "tokens_scored": report.tokens_scored, "text_tokens": tokens.len(), "kv": a.m.kv.to_string(),
                "sparse_budget": a.m.sparse_budget, "seconds": secs})
        );
    } else {
        println!(
            "perplexity {:.4} over {} windows of {} tokens ({} predictions scored, kv {}, sparse budget {:?}, {:.1}s)",
            report.ppl,
            report.chunks,
            report.ctx,
            report.tokens_scored,
            a.m.kv,
            a.m.sparse_budget,
            secs
        );
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct AdaptersLocation {
    /// The adapters folder (default: $EDGELORA_DATA/adapters; the data folder defaults to
    /// $XDG_DATA_HOME/edgelora or ~/.local/share/edgelora).
    #[arg(long)]
    pub adapters: Option<PathBuf>,
    /// The base model the adapters are for (only its config is read; default: SmolLM2-135M-Instruct
    /// Q4_1, fetched on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
}

impl AdaptersLocation {
    fn dir(&self) -> PathBuf {
        self.adapters
            .clone()
            .unwrap_or_else(crate::adapters::registry::default_adapters_dir)
    }

    fn config(&self) -> Result<crate::model::ModelConfig> {
        let path = match &self.model {
            Some(p) => p.clone(),
            None => crate::default_model::ensure()
                .map_err(anyhow::Error::msg)
                .context("fetching the default model")?,
        };
        crate::model::probe::probe_config(&path)
            .with_context(|| format!("reading the config of {}", path.display()))
    }

    fn registry(&self, fingerprint: [u8; 32]) -> Result<crate::adapters::Registry> {
        let dir = self.dir();
        crate::adapters::Registry::open(&dir, fingerprint)
            .with_context(|| format!("opening the adapters folder {}", dir.display()))
    }
}

#[derive(Subcommand, Debug)]
pub enum AdaptersCommand {
    /// Convert a PEFT LoRA folder into a pack in the adapters folder.
    Import {
        /// The PEFT folder (adapter_config.json + adapter_model.safetensors).
        peft_dir: PathBuf,
        /// The adapter's id: 1-64 of [A-Za-z0-9._-], starting with a letter or digit. Requests
        /// name it as their `model`.
        #[arg(long)]
        id: String,
        /// Who contributed the adapter (recorded in its manifest and in attribution events).
        #[arg(long)]
        contributor: String,
        /// The adapter's license, e.g. Apache-2.0.
        #[arg(long)]
        license: Option<String>,
        /// A display name (default: the id).
        #[arg(long)]
        name: Option<String>,
        /// Replace an existing adapter of the same id.
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        loc: AdaptersLocation,
    },
    /// List the packs with their state for the base model.
    List {
        #[command(flatten)]
        loc: AdaptersLocation,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print packs' manifests and headers.
    Show {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        loc: AdaptersLocation,
        #[arg(long)]
        json: bool,
    },
    /// Delete packs (--model is accepted and ignored: removing needs no base model).
    Remove {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        loc: AdaptersLocation,
    },
}

fn cmd_adapters(cmd: AdaptersCommand) -> Result<()> {
    use crate::adapters::pack::fingerprint;
    match cmd {
        AdaptersCommand::Import {
            peft_dir,
            id,
            contributor,
            license,
            name,
            replace,
            loc,
        } => {
            crate::adapters::registry::validate_id(&id).map_err(anyhow::Error::msg)?;
            let config = loc.config()?;
            let mut reg = loc.registry(fingerprint(&config))?;
            let req = crate::adapters::ImportRequest {
                id,
                contributor,
                license,
                display_name: name,
                replace,
            };
            let entry = reg.import(&peft_dir, &req, &config)?;
            let info = entry.info.as_ref().expect("an imported pack has its info");
            println!(
                "imported {} (rank {}, {}, {}, {}) into {}",
                info.id(),
                info.rank,
                targets_text(&info.targets),
                info.dtype,
                human_bytes(info.file_len),
                entry.path.display()
            );
            Ok(())
        }
        AdaptersCommand::List { loc, json } => {
            let config = loc.config()?;
            let reg = loc.registry(fingerprint(&config))?;
            if json {
                let v: Vec<serde_json::Value> =
                    reg.iter().map(|(id, e)| entry_json(id, e)).collect();
                println!("{}", serde_json::Value::Array(v));
                return Ok(());
            }
            if reg.is_empty() {
                eprintln!("no adapters in {}", reg.dir().display());
                return Ok(());
            }
            println!(
                "{:<24} {:>4}  {:<28} {:<5} {:>9}  {:<20} STATE",
                "ID", "RANK", "TARGETS", "DTYPE", "SIZE", "CONTRIBUTOR"
            );
            for (id, e) in reg.iter() {
                let (rank, targets, dtype, size, contributor) = match &e.info {
                    Some(i) => (
                        i.rank.to_string(),
                        targets_text(&i.targets),
                        i.dtype.to_string(),
                        human_bytes(i.file_len),
                        i.manifest.contributor.clone(),
                    ),
                    None => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
                };
                println!(
                    "{id:<24} {rank:>4}  {targets:<28} {dtype:<5} {size:>9}  {contributor:<20} {}",
                    e.state.label()
                );
            }
            Ok(())
        }
        AdaptersCommand::Show { ids, loc, json } => {
            let config = loc.config()?;
            let reg = loc.registry(fingerprint(&config))?;
            let mut out = Vec::new();
            for id in &ids {
                let Some(e) = reg.get(id) else {
                    bail!("adapter {id}: not found in {}", reg.dir().display());
                };
                if json {
                    out.push(entry_json(id, e));
                } else {
                    print_entry(id, e, reg.fingerprint());
                }
            }
            if json {
                println!("{}", serde_json::Value::Array(out));
            }
            Ok(())
        }
        AdaptersCommand::Remove { ids, loc } => {
            // Removing needs no base model and no index of the folder.
            let dir = loc.dir();
            for id in &ids {
                crate::adapters::registry::remove_pack(&dir, id, false)?;
                println!("removed {id}");
            }
            Ok(())
        }
    }
}

fn targets_text(t: &[crate::model::Proj]) -> String {
    if t.len() == 7 {
        return "all".into();
    }
    t.iter()
        .map(|p| p.hf_name().trim_end_matches("_proj"))
        .collect::<Vec<_>>()
        .join(",")
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` from unix seconds.
fn utc_text(secs: u64) -> String {
    let (y, m, d, hh, mm, ss) = utc_fields(secs);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}:{ss:02} UTC")
}

/// (year, month, day, hour, minute, second) in UTC from unix seconds (Howard Hinnant's
/// civil_from_days), for the few places that print dates without a date crate.
pub fn utc_fields(secs: u64) -> (i64, i64, i64, u64, u64, u64) {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

fn entry_json(id: &str, e: &crate::adapters::RegistryEntry) -> serde_json::Value {
    use crate::adapters::EntryState;
    use crate::adapters::pack::fingerprint_hex;
    let mut v = serde_json::json!({
        "id": id,
        "path": e.path.display().to_string(),
        "state": if e.state.is_available() { "available" } else { "unavailable" },
    });
    if let EntryState::Unavailable(msg, kind) = &e.state {
        v["error"] = msg.as_str().into();
        v["error_kind"] = (*kind).into();
    }
    if let Some(i) = &e.info {
        let m = &i.manifest;
        let extra = serde_json::json!({
            "display_name": m.display_name,
            "contributor": m.contributor,
            "license": m.license,
            "source": m.source,
            "source_digest": m.source_digest,
            "created": m.created,
            "version": i.version,
            "base_fingerprint": fingerprint_hex(&i.fingerprint),
            "rank": i.rank,
            "alpha": i.alpha,
            "scaling": i.scaling,
            "use_rslora": i.use_rslora,
            "dtype": i.dtype.name(),
            "targets": i.targets.iter().map(|p| p.hf_name()).collect::<Vec<_>>(),
            "tensors": i.tensors.len(),
            "layers": i.n_layers,
            "payload_offset": i.payload_offset,
            "payload_bytes": i.payload_len,
            "payload_digest": fingerprint_hex(&i.payload_digest),
            "bytes": i.file_len,
        });
        if let (Some(o), Some(x)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(x.clone());
        }
    }
    v
}

fn print_entry(id: &str, e: &crate::adapters::RegistryEntry, base: &[u8; 32]) {
    use crate::adapters::EntryState;
    use crate::adapters::pack::fingerprint_hex;
    println!("{id}");
    println!("  path            {}", e.path.display());
    match &e.state {
        EntryState::Available => println!("  state           available"),
        EntryState::Unavailable(msg, kind) => println!("  state           {kind}: {msg}"),
    }
    let Some(i) = &e.info else {
        return;
    };
    let m = &i.manifest;
    println!("  display name    {}", m.display_name);
    println!("  contributor     {}", m.contributor);
    println!(
        "  license         {}",
        m.license.as_deref().unwrap_or("(none given)")
    );
    println!(
        "  source          {} (blake3 {})",
        m.source, m.source_digest
    );
    println!("  created         {} ({})", utc_text(m.created), m.created);
    println!("  pack version    {}", i.version);
    println!(
        "  base model      {}{}",
        fingerprint_hex(&i.fingerprint),
        if i.fingerprint == *base {
            " (this model)"
        } else {
            ""
        }
    );
    println!(
        "  rank            {} (alpha {}, scaling {}{})",
        i.rank,
        i.alpha,
        i.scaling,
        if i.use_rslora { ", rsLoRA" } else { "" }
    );
    println!(
        "  targets         {}",
        i.targets
            .iter()
            .map(|p| p.hf_name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  tensors         {} over {} layers, {}",
        i.tensors.len(),
        i.n_layers,
        i.dtype
    );
    println!(
        "  payload         {} at offset {} (blake3 {})",
        human_bytes(i.payload_len),
        i.payload_offset,
        fingerprint_hex(&i.payload_digest)
    );
    println!("  file            {}", human_bytes(i.file_len));
}

fn ledger_key(dir: &Path) -> Result<edgelora_ledger::PublicKey> {
    let p = dir.join(edgelora_ledger::PUBLIC_KEY_FILE);
    edgelora_ledger::PublicKey::load(&p).with_context(|| format!("reading {}", p.display()))
}

fn cmd_ledger(cmd: LedgerCommand) -> Result<()> {
    match cmd {
        LedgerCommand::Verify(d) => {
            let dir = d.dir();
            let key = ledger_key(&dir)?;
            match edgelora_ledger::verify(&dir, &key) {
                Ok(r) => {
                    if d.json {
                        println!(
                            "{}",
                            serde_json::json!({"ok": true, "segments": r.segments, "events": r.events,
                                "next_seq": r.next_seq, "checkpoints": r.checkpoints,
                                "unsigned_tail": r.unsigned_tail, "epoch": r.epoch})
                        );
                    } else {
                        println!(
                            "ok: {} events in {} segment(s), {} signed checkpoint(s) (epoch {}), {} event(s) after the last one",
                            r.events, r.segments, r.checkpoints, r.epoch, r.unsigned_tail
                        );
                    }
                    Ok(())
                }
                Err(e) => bail!("ledger {}: {e}", dir.display()),
            }
        }
        LedgerCommand::Inspect(d) => {
            for seg in edgelora_ledger::inspect::inspect(&d.dir())? {
                println!("{} ({} bytes)", seg.path.display(), seg.file_len);
                for f in &seg.frames {
                    println!("  @{:>10} {:>6} B  {}", f.offset, f.len, f.summary);
                }
                if let Some((off, why)) = &seg.fault {
                    println!("  @{off:>10} FAULT: {why}");
                }
            }
            Ok(())
        }
        LedgerCommand::Counters(d) => {
            let dir = d.dir();
            let r = edgelora_ledger::verify(&dir, &ledger_key(&dir)?)
                .map_err(|e| anyhow::anyhow!("ledger {}: {e}", dir.display()))?;
            let rows: Vec<serde_json::Value> = r
                .counters
                .iter()
                .map(|(who, kind, c)| {
                    serde_json::json!({"contributor": who, "kind": kind.name(), "requests": c.requests,
                        "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens})
                })
                .collect();
            if d.json {
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!(
                    "{:<32} {:<8} {:>10} {:>14} {:>17}",
                    "contributor", "kind", "requests", "prompt tokens", "completion tokens"
                );
                for (who, kind, c) in r.counters.iter() {
                    println!(
                        "{who:<32} {:<8} {:>10} {:>14} {:>17}",
                        kind.name(),
                        c.requests,
                        c.prompt_tokens,
                        c.completion_tokens
                    );
                }
            }
            Ok(())
        }
        LedgerCommand::Proof { d, seq } => {
            let dir = d.dir();
            let key = ledger_key(&dir)?;
            let p = edgelora_ledger::inspect::prove(&dir, &key, seq)
                .map_err(|e| anyhow::anyhow!("ledger {}: {e}", dir.display()))?;
            p.verify(&key)
                .map_err(|e| anyhow::anyhow!("the proof of event {seq} does not verify: {e}"))?;
            let hex = |h: &[u8]| h.iter().map(|b| format!("{b:02x}")).collect::<String>();
            println!(
                "{}",
                serde_json::json!({"seq": p.event.seq, "leaf_index": p.leaf_index,
                    "leaf_hash": hex(&p.leaf_hash),
                    "path": p.path.iter().map(|h| hex(h)).collect::<Vec<_>>(),
                    "checkpoint": p.checkpoint.note(), "verified": true})
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod adapters_cli_tests {
    use super::*;

    #[test]
    fn adapters_utc_text_and_sizes() {
        assert_eq!(utc_text(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_text(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc_text(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(8192), "8.0 KiB");
        assert_eq!(targets_text(&crate::model::Proj::ALL), "all");
        assert_eq!(
            targets_text(&[crate::model::Proj::Q, crate::model::Proj::V]),
            "q,v"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Parser, Debug)]
    struct Flags {
        #[command(flatten)]
        m: ModelArgs,
    }

    fn parse(args: &[&str]) -> Result<ModelArgs, clap::Error> {
        Flags::try_parse_from(std::iter::once("t").chain(args.iter().copied())).map(|f| f.m)
    }

    #[test]
    fn sparse_flags_make_the_sparse_config() {
        assert_eq!(parse(&[]).unwrap().sparse(), None);
        let head = parse(&["--sparse-budget", "256"])
            .unwrap()
            .sparse()
            .unwrap();
        assert_eq!(
            head,
            SparseConfig {
                budget_tokens: 256,
                recent_pages: 4,
                group_shared: false
            }
        );
        let group = parse(&[
            "--sparse-budget",
            "512",
            "--sparse-recent",
            "2",
            "--sparse-select",
            "group",
        ])
        .unwrap()
        .sparse()
        .unwrap();
        assert_eq!(
            group,
            SparseConfig {
                budget_tokens: 512,
                recent_pages: 2,
                group_shared: true
            }
        );
        let err = parse(&["--sparse-select", "heads"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("head") && err.contains("group"), "{err}");
    }
}

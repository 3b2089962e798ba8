// Package process is imcloud's composition root: it assembles the stages
// a configuration asks for into one running process. It binds the
// listeners, opens the broker and the stores through the adapters
// package, wires the stages together and shuts them down in order.
package process

import (
	"context"
	"errors"
	"fmt"
	wmetrics "github.com/ThreeDotsLabs/watermill/components/metrics"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"imcloud/pipeline/metrics"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/adapters"
	"imcloud/pipeline"
	"imcloud/pipeline/clusterauth"
	"imcloud/pipeline/config"
	"imcloud/pipeline/events"
	"imcloud/pipeline/inproc"
	"imcloud/proto/pb"
	"imcloud/stages/cloud"
	"imcloud/stages/job"
	"imcloud/stages/logic"
)

// Addrs are the addresses the process's listeners are bound to; empty where a
// listener is off.
type Addrs struct {
	HTTP, LogicGRPC, APIGRPC               string
	CloudTCP, CloudWS, CloudWSS, CloudGRPC string
	Admin                                  string
}

// Process is a running set of stages.
type Process struct {
	cfg    config.Config
	logger *slog.Logger
	addrs  Addrs

	cancel  context.CancelFunc
	wg      sync.WaitGroup
	errOnce sync.Once
	err     error
	done    chan struct{}

	broker     *pipeline.Broker
	logicGRPC  *grpc.Server
	apiGRPC    *grpc.Server // the push API over gRPC (logic.api_grpc_addr)
	cloudGRPC  *grpc.Server
	httpSrvs   []*http.Server // logic API
	adminSrvs  []*http.Server // admin, stopped last
	cloudHTTP  []*http.Server // WS and WSS
	cloudTCP   net.Listener
	cloudStage *cloud.Stage
	logicStage *logic.Stage
	metrics    *metrics.Metrics // nil: off (no admin.addr, or admin.metrics false)
	health     []*health.Server // NOT_SERVING once the process stops
	// canaryErr is the last canary publish's error ("" when it worked).
	canaryErr atomic.Pointer[string]
	logicConn *grpc.ClientConn
	// logicLocal is cloud's connection to a logic stage of this process.
	logicLocal *inproc.Conn
	router     *pipeline.Router
	jobStage   *job.Stage
	stores     *adapters.Stores
	closers    []func() error // closed last, after the broker
	// leave removes this process from the cluster's shard agreement
	// (agreeShards); nil when it took no part.
	leave func()

	// grpcServerOpts and grpcDialOpts authenticate the internal gRPC
	// calls with the cluster secret and mutual TLS.
	grpcServerOpts []grpc.ServerOption
	grpcDialOpts   []grpc.DialOption
}

// listen binds addr for key, or returns nil when addr is empty.
func listen(key, addr string) (net.Listener, error) {
	if addr == "" {
		return nil, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%s: listen on %s: %w", key, addr, err)
	}
	if err := checkLoopback(key, addr, ln); err != nil {
		_ = ln.Close()
		return nil, err
	}
	return ln, nil
}

// checkLoopback refuses a listener that config.IsLoopback judged to stay
// on this machine but that is bound beyond it: "localhost" is a name, and
// /etc/hosts may map it to any address (0.0.0.0 included). CheckBinds'
// decisions rest on the judgement, so what was bound must bear it out.
func checkLoopback(key, addr string, ln net.Listener) error {
	if !config.IsLoopback(addr) {
		return nil
	}
	tcp, ok := ln.Addr().(*net.TCPAddr)
	if !ok || !tcp.IP.IsLoopback() {
		return fmt.Errorf("%s: %q was taken for loopback but is bound to %s, beyond loopback (does /etc/hosts map localhost elsewhere?): use 127.0.0.1 or ::1", key, addr, ln.Addr())
	}
	return nil
}

func addrOf(ln net.Listener) string {
	if ln == nil {
		return ""
	}
	return ln.Addr().String()
}

// Start runs the stages cfg names. It returns once every listener is bound
// and the cloud stage is registered, so the process is ready to serve.
func Start(ctx context.Context, cfg config.Config, logger *slog.Logger) (_ *Process, err error) {
	// config.Load refuses these too; a Config built in code must not
	// slip past them.
	if err := cfg.CheckBinds(); err != nil {
		return nil, err
	}
	serverOpts, err := clusterauth.ServerOptions(cfg.Cluster, logger.With("component", "cluster auth"))
	if err != nil {
		return nil, err
	}
	dialOpts, err := clusterauth.DialOptions(cfg.Cluster)
	if err != nil {
		return nil, err
	}
	warnExposure(cfg, logger)
	var m *metrics.Metrics
	if cfg.Admin.Addr != "" && cfg.Admin.Metrics {
		m = metrics.New()
		serverOpts = append(serverOpts, serverMetrics(m)...)
		dialOpts = append(dialOpts, grpc.WithChainUnaryInterceptor(m.GRPCClient.UnaryClientInterceptor()),
			grpc.WithChainStreamInterceptor(m.GRPCClient.StreamClientInterceptor()))
	}
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	p := &Process{cfg: cfg, logger: logger, cancel: cancel, done: make(chan struct{}), grpcServerOpts: serverOpts, grpcDialOpts: dialOpts, metrics: m}
	var lns []net.Listener
	defer func() {
		if err != nil {
			for _, ln := range lns {
				if ln != nil {
					_ = ln.Close()
				}
			}
			p.stop(context.Background())
		}
	}()
	bind := func(key, addr string) (net.Listener, error) {
		ln, err := listen(key, addr)
		lns = append(lns, ln)
		return ln, err
	}

	hasLogic, hasJob, hasCloud := cfg.Has(config.StageLogic), cfg.Has(config.StageJob), cfg.Has(config.StageCloud)
	var httpLn, apiLn, logicLn, tcpLn, wsLn, wssLn, cloudLn, adminLn net.Listener
	if hasLogic {
		if httpLn, err = bind("logic.http_addr", cfg.Logic.HTTPAddr); err != nil {
			return nil, err
		}
		if apiLn, err = bind("logic.api_grpc_addr", cfg.Logic.APIGRPCAddr); err != nil {
			return nil, err
		}
		if logicLn, err = bind("logic.grpc_addr", cfg.Logic.GRPCAddr); err != nil {
			return nil, err
		}
	}
	if hasCloud {
		if tcpLn, err = bind("cloud.tcp_addr", cfg.Cloud.TCPAddr); err != nil {
			return nil, err
		}
		if wsLn, err = bind("cloud.ws_addr", cfg.Cloud.WSAddr); err != nil {
			return nil, err
		}
		if wssLn, err = bind("cloud.wss_addr", cfg.Cloud.WSSAddr); err != nil {
			return nil, err
		}
		if cloudLn, err = bind("cloud.grpc_addr", cfg.Cloud.GRPCAddr); err != nil {
			return nil, err
		}
	}
	if adminLn, err = bind("admin.addr", cfg.Admin.Addr); err != nil {
		return nil, err
	}
	p.addrs = Addrs{
		HTTP: addrOf(httpLn), APIGRPC: addrOf(apiLn), LogicGRPC: addrOf(logicLn),
		CloudTCP: addrOf(tcpLn), CloudWS: addrOf(wsLn), CloudWSS: addrOf(wssLn), CloudGRPC: addrOf(cloudLn),
		Admin: addrOf(adminLn),
	}

	p.stores, err = adapters.OpenStores(runCtx, cfg, logger)
	if err != nil {
		return nil, err
	}
	p.closers = append(p.closers, p.stores.Close)
	if p.stores.Run != nil {
		p.goLoop(p.stores.Run, runCtx)
	}
	if hasLogic || hasJob {
		if err := p.agreeShards(runCtx); err != nil {
			return nil, err
		}
	}
	p.broker, err = adapters.OpenBroker(cfg, logger)
	if err != nil {
		return nil, fmt.Errorf("connect broker: %w", err)
	}

	emitter, err := p.startEvents(runCtx)
	if err != nil {
		return nil, err
	}

	var logicStage *logic.Stage
	if hasLogic {
		logicStage, err = logic.New(cfg.Logic, logic.Options{
			// Concurrent pushes travel to job together: one broker
			// message and one router pass for up to pipeline.MaxBundle.
			Registry: p.stores.Registry, Publisher: pipeline.NewBundler(p.broker.Publisher), PushTopics: cfg.Topics.PushTopics(),
			Replies: p.stores.Replies, History: p.stores.History, HistoryLimits: cfg.History, Logger: logger.With("stage", "logic"),
			Heartbeat: cfg.Cloud.HeartbeatInterval, CloudDial: p.grpcDialOpts, Events: emitter,
			NodesTTL: p.nodesTTL(), Metrics: p.metrics.LogicPart(),
		})
		if err != nil {
			return nil, err
		}
		p.logicStage = logicStage
		p.logicGRPC = p.grpcServer()
		logicStage.RegisterGRPC(p.logicGRPC)
		p.closers = append(p.closers, logicStage.Close)
		p.serve("logic grpc", func() error { return p.logicGRPC.Serve(logicLn) })
	}

	if hasCloud {
		if err := p.startCloud(runCtx, tcpLn, wsLn, wssLn, cloudLn, emitter); err != nil {
			return nil, err
		}
	}

	if hasJob {
		if err := p.startJob(runCtx); err != nil {
			return nil, err
		}
	}
	// Processes that publish to the push topic send canaries through it:
	// each job's reach every cloud node, and a logic that cannot publish
	// says so in its /readyz ("broker") before a push fails.
	if cfg.Job.CanaryInterval > 0 && (cfg.Has(config.StageJob) || cfg.Has(config.StageLogic)) {
		p.goLoop(p.canaries, runCtx)
	}

	// The push API opens last: an embedded broker drops what is published
	// before job subscribes, and a 200 must never stand for a dropped push.
	if logicStage != nil {
		p.serveHTTP(&p.httpSrvs, "logic http", logicStage.Handler(), httpLn, false)
		if apiLn != nil {
			// The API key, not the cluster's credentials.
			opts := logicStage.APIServerOptions()
			if p.metrics != nil {
				opts = append(opts, serverMetrics(p.metrics)...)
			}
			p.apiGRPC = p.newGRPCServer(opts...)
			logicStage.RegisterAPI(p.apiGRPC)
			p.serve("logic api grpc", func() error { return p.apiGRPC.Serve(apiLn) })
		}
	}
	if p.metrics != nil {
		// Every method's series from 0, now that the services are
		// registered.
		for _, g := range []*grpc.Server{p.logicGRPC, p.cloudGRPC, p.apiGRPC} {
			if g != nil {
				p.metrics.GRPCServer.InitializeMetrics(g)
			}
		}
	}
	if adminLn != nil {
		h, err := p.adminHandler()
		if err != nil {
			return nil, err
		}
		// Stopped last (stop): /readyz says "draining" while the node
		// drains, rather than refuse the probe.
		p.serveHTTP(&p.adminSrvs, "admin", h, adminLn, false)
	}
	return p, nil
}

func (p *Process) startCloud(ctx context.Context, tcpLn, wsLn, wssLn, grpcLn net.Listener, emitter *events.Emitter) error {
	cfg := p.cfg
	logicAddr := cfg.Cloud.LogicAddr
	if p.addrs.LogicGRPC != "" {
		logicAddr = p.addrs.LogicGRPC
	}
	var conn grpc.ClientConnInterface
	if p.logicStage != nil {
		// logic is in this process: cloud calls it directly (inproc),
		// not through a loopback socket and HTTP/2.
		local := inproc.New()
		p.logicStage.RegisterGRPC(local)
		p.logicLocal, conn = local, local
	} else {
		remote, err := grpc.NewClient(logicAddr, p.grpcDialOpts...)
		if err != nil {
			return fmt.Errorf("cloud.logic_addr %s: %w", logicAddr, err)
		}
		p.logicConn = remote
		conn = remote
	}
	advertise := cfg.Cloud.AdvertiseAddr
	if advertise == "" {
		advertise = advertiseAddr(p.addrs.CloudGRPC, cfg.Has(config.StageJob))
	}
	nodeID := cfg.NodeID
	if nodeID == "" {
		nodeID = advertise
	}
	host, _, _ := net.SplitHostPort(advertise)
	if cfg.Cloud.PublicHost != "" {
		host = cfg.Cloud.PublicHost
	}
	self := &pb.NodeInfo{
		Id: nodeID, GrpcAddr: advertise, Host: host, Weight: int32(cfg.Cloud.Weight),
		TcpPort: port(p.addrs.CloudTCP), WsPort: port(p.addrs.CloudWS), WssPort: port(p.addrs.CloudWSS),
	}
	st := cloud.New(cfg.Cloud, cloud.Options{
		Self:     self,
		Logic:    pb.NewLogicClient(conn),
		Upstream: p.broker.Publisher, UpstreamTopic: cfg.Topics.Upstream,
		Logger:  p.logger.With("stage", "cloud"),
		Events:  emitter,
		Metrics: p.metrics.CloudPart(),
	})
	p.cloudStage = st
	p.cloudGRPC = p.grpcServer()
	st.RegisterGRPC(p.cloudGRPC)
	p.serve("cloud grpc", func() error { return p.cloudGRPC.Serve(grpcLn) })
	regCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := st.Register(regCtx); err != nil {
		hint := fmt.Sprintf("is logic reachable at %s?", logicAddr)
		switch {
		case status.Code(err) == codes.Unauthenticated:
			hint = "does this node hold the same cluster.secret as logic?"
		case cfg.Cluster.MTLS():
			hint += " Do both certificates come from cluster.tls_ca_file, with the dialled host as a SAN?"
		}
		return fmt.Errorf("cloud: %w (%s)", err, hint)
	}
	p.goLoop(st.Run, ctx)
	if tcpLn != nil {
		p.cloudTCP = tcpLn
		p.serve("cloud tcp", func() error { return st.ServeTCP(tcpLn) })
	}
	if wsLn != nil {
		p.serveHTTP(&p.cloudHTTP, "cloud ws", st.WSHandler(), st.Listener(wsLn), false)
	}
	if wssLn != nil {
		p.serveHTTP(&p.cloudHTTP, "cloud wss", st.WSHandler(), st.Listener(wssLn), true)
	}
	return nil
}

// port is the port of a bound address, or 0.
func port(addr string) int32 {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(p)
	return int32(n)
}

// advertiseAddr turns a bound gRPC address into one job can dial.
func advertiseAddr(bound string, jobInProcess bool) string {
	host, port, err := net.SplitHostPort(bound)
	if err != nil {
		return bound
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		host = "127.0.0.1"
		if !jobInProcess {
			if h, err := os.Hostname(); err == nil {
				host = h
			}
		}
	}
	return net.JoinHostPort(host, port)
}

// nodesTTL is how long logic and job use the shared registry's node list
// before reading it again: a tenth of cloud.renew_interval (1 s by
// default). Reading it was two of a room push's four Redis round trips
// and 30 % of the server's CPU (BENCHMARKS.md "History on vs off").
//
// The bound on a dead node: the registry drops a node 3 renew intervals
// after its last report (adapters.Stores' node TTL), and a kept list is
// at most a tenth of one older, so pushes stop going to it at most 3.1
// intervals after its last report instead of 3 — a node that stops
// reporting is dropped within the same order of time, and its keys were
// already retried by job until job.offline_grace. The list's room counts
// are up to one interval old anyway (nodes report them at each renewal),
// so what job skips by room is no staler than before by more than that
// tenth. A node that just registered is looked for again by a key push
// to it (nodecache.NodesWith). The memory registry (standalone, or logic
// and job sharing a process without Redis) is read every time: 0.
func (p *Process) nodesTTL() time.Duration {
	if !p.stores.Shared {
		return 0
	}
	return p.cfg.Cloud.RenewInterval / 10
}

func (p *Process) startJob(ctx context.Context) error {
	cfg := p.cfg
	var nodes job.Nodes
	switch {
	case len(cfg.Job.CloudAddrs) > 0:
		nodes = job.StaticNodes(cfg.Job.CloudAddrs)
	case cfg.Has(config.StageLogic) || p.stores.Shared:
		nodes = p.stores.Registry
	default:
		return errors.New("job.cloud_addrs: job cannot see the cloud nodes: use registry.kind = \"redis\", list them here, or run job with logic (the memory registry lives in logic's process)")
	}
	p.jobStage = job.New(job.Options{
		Nodes: nodes, Logger: p.logger.With("stage", "job"),
		BatchWindow: cfg.Job.RoomBatchWindow, BatchSize: cfg.Job.RoomBatchSize, Timeout: cfg.Job.Timeout,
		CloudDial:    p.grpcDialOpts,
		OfflineGrace: cfg.Job.OfflineGrace,
		NodesTTL:     p.nodesTTL(),
		Metrics:      p.metrics.JobPart(),
	})
	// A job the cloud nodes refuse would take messages and deliver none:
	// it stops here, as a cloud node with a wrong secret does at Register.
	if err := p.jobStage.CheckClouds(ctx); err != nil {
		return err
	}
	rc := routerConfig(cfg.Job)
	if p.metrics != nil {
		rc.Observe = p.metrics.Job.Result
	}
	router, err := pipeline.NewRouter(rc, cfg.Topics.Poison, p.broker.Publisher, p.stores.Dedupe, p.logger.With("stage", "job"))
	if err != nil {
		return err
	}
	if p.metrics != nil {
		// Watermill's own: handler executions and their time, publishes
		// and subscribes, by handler and topic.
		wmetrics.NewPrometheusMetricsBuilder(p.metrics.Registry, "imcloud", "job").AddPrometheusRouterMetrics(router.Router)
	}
	p.router = router
	consumers := 1
	if p.broker.SharedQueue {
		consumers = cfg.Job.Concurrency
	}
	p.jobStage.AddHandlers(router, p.broker.Subscriber, cfg.JobTopics(), consumers)
	p.logger.Info("job consumes the push shards", "stage", "job", "topics", cfg.JobTopics(), "of", cfg.Topics.PushShards, "handlers_each", consumers)
	p.serve("job router", func() error { return router.Run(ctx) })
	select {
	case <-router.Running():
		return nil
	case <-p.done:
		return p.err
	case <-time.After(30 * time.Second):
		return errors.New("job router did not start within 30s")
	}
}

// serve runs fn for the process's lifetime; an error from it stops the
// process.
func (p *Process) serve(name string, fn func() error) {
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		if err := fn(); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, grpc.ErrServerStopped) {
			p.fail(fmt.Errorf("%s: %w", name, err))
		}
	}()
}

func (p *Process) goLoop(fn func(context.Context), ctx context.Context) {
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		fn(ctx)
	}()
}

// httpLimits bound what one connection may hold on an HTTP server.
type httpLimits struct {
	readHeader, read, write, idle time.Duration
	maxHeaderBytes                int
	// oneRequest closes a connection after its first request: a client
	// connection counts against the per-address handshake cap until it
	// authenticates, and with keep-alives a client sending a request that
	// is not an upgrade every few seconds held its slot indefinitely (64
	// such connections locked an address out for as long as they ran).
	oneRequest bool
}

// httpLimitsFor returns the limits of the server named name.
func (p *Process) httpLimitsFor(name string) httpLimits {
	switch name {
	case "logic http":
		l := p.cfg.Logic
		return httpLimits{readHeader: min(10*time.Second, l.ReadTimeout), read: l.ReadTimeout, write: l.WriteTimeout, idle: l.IdleTimeout, maxHeaderBytes: l.MaxHeaderBytes}
	case "admin":
		// The write timeout leaves room for /debug/pprof/profile and
		// /trace, which refuse a duration past it.
		return httpLimits{readHeader: 10 * time.Second, read: 10 * time.Second, write: 2 * time.Minute, idle: time.Minute, maxHeaderBytes: 16 << 10}
	case "cloud ws", "cloud wss":
		// A WebSocket upgrade has no body and a small reply; 32 KiB of
		// headers leaves room for a browser's cookies. gorilla/websocket
		// clears the server's deadlines when it takes the connection
		// over, so these end nothing after the upgrade.
		// The upgrade request is read within the handshake timeout, as
		// the auth packet is after it.
		hs := p.cfg.Cloud.HandshakeTimeout
		return httpLimits{readHeader: hs, read: hs, write: 10 * time.Second, idle: hs, maxHeaderBytes: 32 << 10, oneRequest: true}
	default:
		panic("process: no HTTP limits for server " + name)
	}
}

// newHTTPServer is an HTTP server for h within lim: a slow or idle client
// holds a connection no longer than the limits say.
func newHTTPServer(h http.Handler, lim httpLimits, logger *slog.Logger) *http.Server {
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: lim.readHeader,
		ReadTimeout:       lim.read,
		WriteTimeout:      lim.write,
		IdleTimeout:       lim.idle,
		MaxHeaderBytes:    lim.maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelDebug),
	}
	if lim.oneRequest {
		srv.SetKeepAlivesEnabled(false)
	}
	return srv
}

func (p *Process) serveHTTP(into *[]*http.Server, name string, h http.Handler, ln net.Listener, tls bool) {
	srv := newHTTPServer(h, p.httpLimitsFor(name), p.logger)
	*into = append(*into, srv)
	p.serve(name, func() error {
		if tls {
			return srv.ServeTLS(ln, p.cfg.Cloud.TLSCertFile, p.cfg.Cloud.TLSKeyFile)
		}
		return srv.Serve(ln)
	})
}

func (p *Process) fail(err error) {
	p.errOnce.Do(func() {
		p.err = err
		close(p.done)
	})
}

// Reload applies what cfg changes of the reloadable keys
// (config.Reloadable) and returns, sorted, the keys it applied and those
// that changed but need a restart. level is the logger's level, set to
// cfg's. On an error nothing of logic's changed (the log level may have).
func (p *Process) Reload(cfg config.Config, level *slog.LevelVar) (applied, restart []string, err error) {
	changed, err := config.Diff(p.cfg, cfg)
	if err != nil {
		return nil, nil, err
	}
	for _, k := range changed {
		if slices.Contains(config.Reloadable, k) {
			applied = append(applied, k)
		} else {
			restart = append(restart, k)
		}
	}
	if level != nil {
		var l slog.Level
		if err := l.UnmarshalText([]byte(cfg.Log.Level)); err == nil {
			level.Set(l)
		}
	}
	if p.logicStage != nil && cfg.Logic.Auth.Mode != p.cfg.Logic.Auth.Mode {
		// Keys of another mode mean nothing to this one: all of it waits
		// for a restart.
		var keep []string
		for _, k := range applied {
			if strings.HasPrefix(k, "logic.") {
				restart = append(restart, k)
			} else {
				keep = append(keep, k)
			}
		}
		applied = keep
		slices.Sort(restart)
		cfg.Logic = p.cfg.Logic
	}
	if p.logicStage != nil {
		// Always: a public key file may have new contents under its old
		// name.
		if err := p.logicStage.Reload(cfg.Logic); err != nil {
			return nil, nil, err
		}
	}
	// What was applied is now the process's; the rest waits for a restart.
	p.cfg.Log.Level = cfg.Log.Level
	p.cfg.Logic.APIKeys, p.cfg.Logic.Auth.JWTSecret, p.cfg.Logic.Auth.JWTPublicKeyFile, p.cfg.Logic.CORSOrigins =
		cfg.Logic.APIKeys, cfg.Logic.Auth.JWTSecret, cfg.Logic.Auth.JWTPublicKeyFile, cfg.Logic.CORSOrigins
	return applied, restart, nil
}

// Addrs returns where the process listens.
func (p *Process) Addrs() Addrs { return p.addrs }

// Broker is the process's broker connection.
func (p *Process) Broker() *pipeline.Broker { return p.broker }

// Done is closed when a stage fails; Err says why.
func (p *Process) Done() <-chan struct{} { return p.done }

// Err is the failure that closed Done.
func (p *Process) Err() error { return p.err }

// Shutdown stops the process in the order stop gives: the push API stops
// taking pushes, job finishes the messages in hand, cloud stops accepting
// and closes its clients with 1001, then the gRPC servers, the broker and
// the stores stop. ctx bounds the wait for clients and in-flight work.
func (p *Process) Shutdown(ctx context.Context) error {
	p.stop(ctx)
	p.fail(nil)
	return nil
}

// stop shuts down in the order that loses nothing accepted:
//
//  1. logic's push API, HTTP and gRPC (and the admin listener), stops
//     taking requests;
//  2. job's router closes, finishing the deliveries in hand;
//  3. cloud stops accepting (WebSocket and TCP listeners) and drains:
//     what is queued is written, then each client is closed with 1001,
//     for up to cloud.drain_timeout;
//  4. cloud's and logic's gRPC servers stop gracefully (until ctx ends),
//     and cloud's in-process connection to logic with them;
//  5. job's connections to cloud nodes, cloud's connection to logic, the
//     broker and the stores close, and the stages' goroutines are waited
//     for.
func (p *Process) stop(ctx context.Context) {
	for _, h := range p.health {
		h.Shutdown() // NOT_SERVING from now on
	}
	if p.cloudStage != nil {
		// Out of the node list and not ready first, while logic, job and
		// the listeners still run.
		p.cloudStage.Leave(ctx)
	}
	for _, s := range p.httpSrvs {
		_ = s.Shutdown(ctx)
	}
	if p.apiGRPC != nil {
		// Streams answer what they hold and end; one whose producer
		// stopped reading its results is cut after apiStopWait, so that
		// job and cloud keep the rest of ctx to deliver what was accepted.
		p.logicStage.StopStreams()
		sctx, cancel := context.WithTimeout(ctx, apiStopWait)
		gracefulStop(sctx, p.apiGRPC)
		cancel()
	}
	if p.router != nil {
		_ = p.router.Close()
	}
	for _, s := range p.cloudHTTP {
		_ = s.Shutdown(ctx)
	}
	if p.cloudTCP != nil {
		_ = p.cloudTCP.Close()
	}
	if p.cloudStage != nil {
		dctx, cancel := context.WithTimeout(ctx, p.cfg.Cloud.DrainTimeout)
		if err := p.cloudStage.Drain(dctx); err != nil {
			p.logger.Warn("shutdown", "err", err)
		}
		cancel()
	}
	for _, g := range []*grpc.Server{p.cloudGRPC, p.logicGRPC} {
		if g != nil {
			gracefulStop(ctx, g)
		}
	}
	if p.logicLocal != nil {
		p.logicLocal.Close() // as logic's gRPC server: cloud's calls end here
	}
	p.cancel()
	if p.jobStage != nil {
		_ = p.jobStage.Close()
	}
	if p.logicConn != nil {
		_ = p.logicConn.Close()
	}
	if p.broker != nil {
		if err := p.broker.Close(); err != nil {
			p.logger.Warn("close broker", "err", err)
		}
	}
	if p.leave != nil {
		p.leave()
	}
	for _, c := range p.closers {
		_ = c()
	}
	for _, s := range p.adminSrvs {
		_ = s.Shutdown(ctx)
	}
	p.wg.Wait()
}

// apiStopWait bounds the gRPC push API's graceful stop.
const apiStopWait = 5 * time.Second

func gracefulStop(ctx context.Context, g *grpc.Server) {
	stopped := make(chan struct{})
	go func() { g.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-ctx.Done():
		g.Stop()
	}
}

// warnExposure logs, once at start-up, what the configuration exposes on
// purpose (config.Exposures).
func warnExposure(cfg config.Config, logger *slog.Logger) {
	for _, w := range cfg.Exposures() {
		logger.Warn(w)
	}
}

// adminHandler serves health, profiles and, with the embedded broker,
// its poison topic (poison.go). It never serves /debug/pprof/cmdline: the
// command line holds whatever was given with --set, secrets included.
func (p *Process) adminHandler() (http.Handler, error) {
	mux := baseAdminMux()
	mux.HandleFunc("/readyz", p.readyz)
	admin, local, err := adapters.LocalPoison(p.cfg, p.broker)
	if err != nil {
		return nil, err
	}
	if local {
		p.closers = append(p.closers, admin.Close)
		h := &poisonHandler{admin: admin, topic: p.cfg.Topics.Poison, logger: p.logger.With("component", "admin")}
		h.register(mux)
	} else {
		registerNoPoison(mux, p.cfg.Broker.Kind)
	}
	if p.metrics != nil {
		if p.router != nil && !local {
			// A shared broker's poison topic, for its depth.
			if admin, err = adapters.OpenPoison(p.cfg, p.logger); err != nil {
				p.logger.Warn("poison depth not measured", "err", err)
				admin = nil
			} else {
				p.closers = append(p.closers, admin.Close)
			}
		}
		if p.router == nil {
			admin = nil // job does not run here: another process reports it
		}
		p.registerFuncs(admin)
		mux.Handle("/metrics", promhttp.HandlerFor(p.metrics.Registry, promhttp.HandlerOpts{Registry: p.metrics.Registry}))
	}
	return mux, nil
}

// baseAdminMux serves health and profiles.
// readyz answers 200 when every dependency of the stages this process
// runs is in order, and 503 naming each that is not: a cloud node that
// drains or that logic has not heard from in three renew intervals, a job
// router that is not running, a registry that does not answer. Each check
// is bounded by a second.
func (p *Process) readyz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), time.Second)
	defer cancel()
	var lines []string
	failed := 0
	check := func(name string, err error) {
		if err != nil {
			failed++
			lines = append(lines, name+": "+err.Error())
			return
		}
		lines = append(lines, name+": ok")
	}
	if p.cloudStage != nil {
		switch {
		case p.cloudStage.Draining():
			check("cloud", errors.New("draining: taking no new clients"))
		case !p.cloudStage.Registered():
			check("cloud", errors.New("not registered with logic: its last report was not answered in time"))
		default:
			check("cloud", nil)
		}
	}
	if p.cloudStage != nil && p.cfg.Cloud.CanaryTimeout > 0 {
		// No job's canary for cloud.canary_timeout: the pipeline does
		// not reach this node, whatever else is up.
		if age, _ := p.cloudStage.Canary(); age > p.cfg.Cloud.CanaryTimeout {
			check("canary", fmt.Errorf("no job canary reached this node for %s (the broker, job or the gRPC path to this node is down)", age.Round(time.Second)))
		} else {
			check("canary", nil)
		}
	}
	if e := p.canaryErr.Load(); e != nil && *e != "" {
		check("broker", fmt.Errorf("the canary could not be published: %s", *e))
	}
	if p.jobStage != nil {
		// Two canaries in a row this job could not hand to every cloud
		// node: it takes messages it cannot deliver everywhere.
		if n, e := p.jobStage.CanaryFailures(); n >= 2 {
			check("delivery", fmt.Errorf("%d canaries in a row did not reach every cloud node: %s", n, e))
		}
	}
	if p.router != nil {
		switch {
		case p.router.IsClosed():
			check("job", errors.New("router closed"))
		case !p.router.IsRunning():
			check("job", errors.New("router not running"))
		default:
			check("job", nil)
		}
	}
	if p.stores != nil && p.stores.Registry != nil {
		_, err := p.stores.Registry.Nodes(ctx)
		check("registry", err)
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	if failed > 0 {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	_, _ = w.Write([]byte(strings.Join(lines, "\n") + "\n"))
}

func baseAdminMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "not served: the command line can hold secrets", http.StatusNotFound)
	})
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// routerConfig maps the job.* keys to job's router.
func routerConfig(j config.Job) pipeline.RouterConfig {
	rc := pipeline.RouterConfig{
		Throttle: j.Throttle, Timeout: j.Timeout,
		MaxRetries: j.Retry.MaxRetries, InitialInterval: j.Retry.InitialInterval,
		MaxInterval: j.Retry.MaxInterval, Multiplier: j.Retry.Multiplier,
		ConfigHold: config.ConfigFaultHold,
	}
	if j.Dedupe.Enabled {
		rc.DedupeTTL = j.Dedupe.TTL
	}
	return rc
}

// grpcServer is a gRPC server with the cluster's credentials, the
// metrics interceptors when metrics are on, and the standard health
// service (grpc.health.v1: SERVING while the process runs).
func (p *Process) grpcServer() *grpc.Server { return p.newGRPCServer(p.grpcServerOpts...) }

// newGRPCServer is a gRPC server with opts and the standard health
// service, which shutdown turns NOT_SERVING.
func (p *Process) newGRPCServer(opts ...grpc.ServerOption) *grpc.Server {
	s := grpc.NewServer(opts...)
	hs := health.NewServer()
	p.health = append(p.health, hs)
	healthpb.RegisterHealthServer(s, hs)
	return s
}

// serverMetrics are the interceptors that record a gRPC server's calls.
func serverMetrics(m *metrics.Metrics) []grpc.ServerOption {
	return []grpc.ServerOption{grpc.ChainUnaryInterceptor(m.GRPCServer.UnaryServerInterceptor()),
		grpc.ChainStreamInterceptor(m.GRPCServer.StreamServerInterceptor())}
}

// registerFuncs registers the metrics read from the stages when scraped:
// what they count already, at no cost per event.
func (p *Process) registerFuncs(poison pipeline.PoisonAdmin) {
	reg := p.metrics.Registry
	if poison != nil {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "imcloud_poison_messages",
			Help: "Messages in the poison topic now (read from the broker when scraped; NaN if it does not answer within 2 s)."}, func() float64 {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			n, err := poison.Depth(ctx)
			if err != nil {
				return math.NaN()
			}
			return float64(n)
		}))
	}
	if st := p.cloudStage; st != nil {
		reg.MustRegister(
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "imcloud_cloud_parked_connections",
				Help: "Idle connections waiting without a reader goroutine (cloud.park_idle)."}, func() float64 { return float64(st.Parked()) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "imcloud_cloud_rooms",
				Help: "Rooms with a member on this node, as last reported to logic."}, func() float64 { return float64(st.Rooms()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "imcloud_cloud_slow_consumer_closes_total",
				Help: "Clients closed for not reading fast enough (4008)."}, func() float64 { return float64(st.SlowConsumers()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "imcloud_cloud_refused_connections_total",
				Help: "Connections closed at accept: over cloud.max_conns or cloud.max_handshakes_per_ip."}, func() float64 { return float64(st.RefusedConns()) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "imcloud_canary_age_seconds",
				Help: "Since a job's canary last reached this node (since start, before the first)."}, func() float64 { a, _ := st.Canary(); return a.Seconds() }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "imcloud_canary_lag_seconds",
				Help: "From the last canary's publish by a job to its arrival at this node."}, func() float64 { _, l := st.Canary(); return l.Seconds() }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "imcloud_cloud_upstream_failures_total",
				Help: "Client messages (op 4) the broker did not take (the client was closed with 1013)."}, func() float64 { return float64(st.UpstreamFailures()) }),
		)
	}
}

// canaries publishes a canary through each push shard job consumes every
// job.canary_interval until ctx ends: every cloud node records its
// arrival (its /readyz and imcloud_canary_* metrics), and a publish the
// broker refuses is this process's /readyz "broker" line.
func (p *Process) canaries(ctx context.Context) {
	t := time.NewTicker(p.cfg.Job.CanaryInterval)
	defer t.Stop()
	source := p.cfg.NodeID
	if source == "" {
		source = fmt.Sprint(os.Getpid())
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		// One through each shard this job consumes: a shard whose
		// queue stopped taking messages is this process's /readyz too.
		var err error
		for _, topic := range p.cfg.JobTopics() {
			msg, merr := pipeline.NewCanaryMessage(source)
			if merr == nil {
				pctx, cancel := context.WithTimeout(ctx, p.cfg.Job.CanaryInterval)
				msg.SetContext(pctx)
				merr = p.broker.Publisher.Publish(topic, msg)
				cancel()
			}
			if merr != nil {
				err = fmt.Errorf("canary to %s: %w", topic, merr)
			}
		}
		e := ""
		if err != nil {
			e = err.Error()
			p.logger.Debug("canary not published", "err", err)
		}
		p.canaryErr.Store(&e)
	}
}

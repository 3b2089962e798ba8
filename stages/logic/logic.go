// Package logic is the front door for business backends: the HTTP push API,
// client authentication for cloud nodes, and the session registry. Every
// accepted push is published to the broker as PushMsg envelopes.
package logic

import (
	"context"
	"crypto/sha256"
	"fmt"
	"imcloud/pipeline/metrics"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"google.golang.org/grpc"

	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/pipeline/events"
	"imcloud/pipeline/idempotency"
	"imcloud/proto/pb"
	"imcloud/stages/internal/cloudconn"
	"imcloud/stages/logic/token"
)

// Stage is a configured logic stage, ready to be served.
type Stage struct {
	cfg       config.Logic
	heartbeat time.Duration // the clients' heartbeat period, for /nodes/weighted
	pusher    *Pusher
	history   pipeline.History // nil: not kept
	replies   ReplyStore
	grpc      *grpcServer
	logger    *slog.Logger
	// failLog limits logs of failing dependencies: an outage fails every
	// request, and one line a second says as much as thousands.
	failLog *pipeline.RateLog
	metrics *metrics.Logic // nil: off
	// routes are the paths Handler serves and their methods (HEAD with
	// GET): the OpenAPI document's test compares them.
	routes map[string][]string
	// pushes are the push routes by name (pushRoutes), for batch items.
	pushes map[string]pushRoute
	// access and auth are what SIGHUP reloads (reload.go).
	access atomic.Pointer[access]
	auth   *swapAuth
	// inProcess: every store logic uses answers from memory
	// (pipeline.InProcess), so a batch's lookups run one after another.
	inProcess bool
	// streamsStop is closed by StopStreams; streams counts the open
	// PushStreams.
	streamsStop chan struct{}
	streams     atomic.Int64
	stopStreams sync.Once
	// presence asks one cloud node for a room's members; nil: over gRPC
	// (tests replace it).
	presence func(ctx context.Context, n *pb.NodeInfo, room string) (*pb.PresenceReply, error)
}

// ReplyStore keeps the reservation and reply of each request made with an
// Idempotency-Key, so that a retry is answered without publishing again
// and a concurrent one is refused.
type ReplyStore = idempotency.Store

// Options are the logic stage's collaborators.
type Options struct {
	Registry  pipeline.Registry
	Publisher message.Publisher
	// PushTopics are the push topic's shards (config.Topics.PushTopics):
	// each push goes to the shard of its room or user (pipeline.ShardOf).
	PushTopics []string
	Replies    ReplyStore
	// History gives pushes their stream positions and keeps the last
	// messages of each stream; nil: pushes get no positions and
	// /im/history answers 404 (history is not kept).
	History pipeline.History
	// Events receives offline events; nil: off.
	Events *events.Emitter
	// HistoryLimits is what each class of stream keeps ([history]); the
	// zero value means config.Default()'s.
	HistoryLimits config.History
	// Heartbeat is the period clients are told to heartbeat at.
	Heartbeat time.Duration
	Logger    *slog.Logger
	// CloudDial authenticates the calls to cloud nodes (clusterauth).
	CloudDial []grpc.DialOption
	// NodesTTL is how long pushes may use the registry's node list before
	// reading it again; 0: every push reads it (the memory registry, where
	// reading costs nothing). See nodecache for the bound on how late a
	// lapsed node is dropped.
	NodesTTL time.Duration
	// Metrics records pushes and publishes; nil records nothing.
	Metrics *metrics.Logic
}

// New assembles the logic stage.
func New(cfg config.Logic, o Options) (*Stage, error) {
	if len(o.PushTopics) == 0 || slices.Contains(o.PushTopics, "") {
		return nil, fmt.Errorf("logic: push topics %q: want at least one, none empty", o.PushTopics)
	}
	auth, err := token.NewAuthenticator(cfg.Auth)
	if err != nil {
		return nil, fmt.Errorf("logic: %w", err)
	}
	if cfg.Auth.Mode == config.AuthInsecureJSON {
		o.Logger.Warn("logic.auth.mode is insecure-json: client auth bodies are trusted as is, and any client may join any room (op 12) and subscribe any operation (op 14), as in goim; use it only to migrate goim clients or for local demos")
	}
	limits := o.HistoryLimits
	if limits.MaxSize == 0 {
		limits = config.Default().History
	}
	swap := newSwapAuth(auth)
	rpc := newGRPCServer(cfg, swap, o.Registry,
		&replacer{registry: o.Registry, logger: o.Logger, clouds: cloudconn.New(o.CloudDial...)}, o.Logger)
	limit := func(stream string) pipeline.StreamLimit {
		l := limits.Limit(stream)
		return pipeline.StreamLimit{Size: l.Size, TTL: l.TTL}
	}
	rpc.history = o.History
	rpc.acks = limits.User.Acks
	rpc.limit = limit
	st := &Stage{
		cfg:       cfg,
		auth:      swap,
		metrics:   o.Metrics,
		heartbeat: o.Heartbeat,
		pusher: &Pusher{registry: o.Registry, nodes: newNodeLister(o.Registry, o.NodesTTL), publisher: o.Publisher, topics: o.PushTopics, events: o.Events, history: o.History,
			limit: limit, metrics: o.Metrics, voidFail: pipeline.NewRateLog(o.Logger, slog.LevelError, time.Second)},
		history: o.History,
		replies: o.Replies,
		grpc:    rpc,
		logger:  o.Logger,
		failLog: pipeline.NewRateLog(o.Logger, slog.LevelError, time.Second),

		streamsStop: make(chan struct{}),
		inProcess:   pipeline.IsInProcess(o.Registry, o.History, o.Replies),
	}
	st.pushes = st.pushRoutes()
	st.access.Store(newAccess(cfg))
	return st, nil
}

func hashKeys(keys []string) [][sha256.Size]byte {
	sums := make([][sha256.Size]byte, len(keys))
	for i, k := range keys {
		sums[i] = sha256.Sum256([]byte(k))
	}
	return sums
}

// Close releases the stage's connections to cloud nodes.
func (st *Stage) Close() error { return st.grpc.replacer.Close() }

// RegisterGRPC adds the Logic service to s.
func (st *Stage) RegisterGRPC(s grpc.ServiceRegistrar) { pb.RegisterLogicServer(s, st.grpc) }

// pushRoutes are the push routes by name, as the HTTP API serves them
// and a batch item or gRPC push names them.
func (st *Stage) pushRoutes() map[string]pushRoute {
	return map[string]pushRoute{
		"push/keys": st.pushKeys,
		"push/mids": st.pushMids,
		"push/room": st.pushRoom,
		"push/all":  st.pushAll,
	}
}

// Handler returns the HTTP API, answering under /im/ and /goim/.
func (st *Stage) Handler() http.Handler {
	mux := http.NewServeMux()
	routes := st.pushes
	stats := map[string]statsRoute{
		"online/top":   onlineTop,
		"online/room":  onlineRoom,
		"online/total": onlineTotal,
	}
	// allow lists each route's methods: a known path asked with another
	// method is answered 405, not the catch-all's 404.
	allow := map[string][]string{}
	handle := func(method, path string, h http.Handler) {
		mux.Handle(method+" "+path, h)
		allow[path] = append(allow[path], method)
		if method == http.MethodGet {
			allow[path] = append(allow[path], http.MethodHead) // ServeMux serves HEAD with GET
		}
	}
	for prefix, a := range map[string]api{"/im/": apiIM, "/goim/": apiGoim} {
		for path, route := range routes {
			handle(http.MethodPost, prefix+path, st.push(a, path, route))
		}
		for path, route := range stats {
			handle(http.MethodGet, prefix+path, st.stats(a, route))
		}
		handle(http.MethodGet, prefix+"history", st.historyRoute(a))
	}
	handle(http.MethodPost, "/im/push/batch", http.HandlerFunc(st.pushBatch))
	handle(http.MethodGet, "/im/nodes/weighted", st.stats(apiIM, st.nodesWeighted))
	handle(http.MethodGet, "/im/presence/room", st.presenceRoom(apiIM))
	handle(http.MethodGet, "/im/online/mids", st.onlineMids(apiIM))
	handle(http.MethodGet, "/goim/nodes/weighted", st.stats(apiGoim, st.goimNodesWeighted))
	handle(http.MethodGet, "/goim/nodes/instances", st.stats(apiGoim, goimNodesInstances))
	handle(http.MethodGet, "/openapi.json", http.HandlerFunc(serveOpenAPI))
	st.routes = allow
	// The catch-all "/" matches every method, so ServeMux prefers it to
	// answering 405 for a known path with the wrong method: it does so here.
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if methods, ok := allow[r.URL.Path]; ok {
			w.Header().Set("Allow", strings.Join(methods, ", "))
			writeError(w, http.StatusMethodNotAllowed, "method "+truncate(r.Method)+" not allowed on "+r.URL.Path+"; use "+methods[0])
			return
		}
		writeError(w, http.StatusNotFound, "no such route: "+truncate(r.Method)+" "+truncate(r.URL.Path))
	})
	// The key is checked before routing: a caller without one learns
	// nothing, not even which routes exist, and its body is never read.
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if st.cors(w, r) {
			return
		}
		if !publicRoutes[r.URL.Path] && !st.authorized(r) {
			refuse(w)
			return
		}
		mux.ServeHTTP(w, r)
	})
}

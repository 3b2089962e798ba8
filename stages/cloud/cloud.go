// Package cloud holds client connections (TCP and WebSocket, goim's v2
// protocol): it authenticates them through logic, keeps their rooms and
// operation filters, and writes out the pushes job delivers over gRPC.
package cloud

import (
	"context"
	"errors"
	"fmt"
	"imcloud/pipeline/metrics"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/gorilla/websocket"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/pipeline/events"
	"imcloud/pipeline/expiring"
	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// logicCallTimeout bounds each call to logic made on a client's behalf.
const logicCallTimeout = 5 * time.Second

// maxDisconnectCalls bounds the Disconnect calls to logic in flight; the
// sessions beyond wait their turn with the small stacks they idled with.
const maxDisconnectCalls = 32

// Stage is a cloud node.
type Stage struct {
	cfg           config.Cloud
	nodeID        string
	self          *pb.NodeInfo
	logic         pb.LogicClient
	upstream      message.Publisher
	upstreamTopic string
	logger        *slog.Logger
	events        *events.Emitter // nil: events off

	buckets  []*bucket
	bufs     *sync.Pool // write buffers
	upgrader *websocket.Upgrader
	// roomOnline holds the cluster-wide room counts logic last reported.
	roomOnline atomic.Pointer[map[string]int32]
	// reported holds the rooms this node last told logic it hosts.
	reported  atomic.Pointer[map[string]struct{}]
	announcer *announcer

	slowConsumers atomic.Int64
	// upstreamFailures counts op 4 messages the broker refused,
	// handshakeFailures connections that did not authenticate; each kind
	// is logged once per logEvery.
	upstreamFailures  atomic.Int64
	upstreamLog       *pipeline.RateLog
	handshakeFailures atomic.Int64
	handshakeLog      *pipeline.RateLog
	originLog         *pipeline.RateLog // WebSocket upgrades refused for their Origin
	renewedAt         atomic.Int64      // unix ns of logic's last answer to a report; 0: none yet
	canaryAt          atomic.Int64      // unix ns a job's canary last arrived; 0: none yet
	canaryLag         atomic.Int64      // ns from that canary's publish to its arrival
	startedAt         time.Time
	announceLog       *pipeline.RateLog
	// delivered remembers recent message ids, so that a call job retries
	// after its deadline passed (the first one having gone through) does
	// not deliver the message twice.
	delivered *expiring.Set
	rounds    *roomRounds
	metrics   *metrics.Cloud // nil records nothing
	// order delivers each room's and user's positioned pushes in stream
	// order (issue 12; order.go).
	order *orderer
	// acker batches clients' acks (op 23) per user to logic (ack.go).
	acker *acker

	limits *connLimiter // cloud.max_conns and cloud.max_handshakes_per_ip

	disconnectSlots chan struct{} // one per Disconnect call in flight
	recoverSlots    chan struct{} // one per recovery History call in flight (maxRecoverCalls)
	recoverBounds   recoverBounds
	recoverBytes    *byteBudget // history bytes recoveries pin (recoverBounds.bytes)
	recoverLog      *pipeline.RateLog
	parker          *parker // nil: every connection keeps its reader
	// connIDs names each connection, to the parker and in logic's
	// registry (ConnectReq.conn); it starts at random so that a restarted
	// node's connections are not taken for its earlier ones.
	connIDs atomic.Uint64

	connMu   sync.RWMutex // orders conns.Add before Drain's Wait
	draining bool
	conns    sync.WaitGroup

	paced     chan struct{}   // one slot per paced broadcast running
	pacedCtx  context.Context // ends when the node drains
	stopPaced context.CancelFunc
	pacedWG   sync.WaitGroup
}

// Options are a cloud node's collaborators.
type Options struct {
	// Self describes the node to the registry: its id, the gRPC address
	// job dials, where clients connect, its weight. Counts are filled in.
	Self          *pb.NodeInfo
	Logic         pb.LogicClient
	Upstream      message.Publisher
	UpstreamTopic string
	Logger        *slog.Logger
	// Events receives connect, disconnect and delivered events; nil: off.
	Events *events.Emitter
	// Metrics records connections, closes, writes and latency; nil: off.
	Metrics *metrics.Cloud

	// recoverBounds replaces defaultRecoverBounds when set (tests).
	recoverBounds *recoverBounds
}

// New returns a cloud node.
func New(cfg config.Cloud, o Options) *Stage {
	s := &Stage{
		cfg:           cfg,
		nodeID:        o.Self.GetId(),
		self:          o.Self,
		logic:         o.Logic,
		upstream:      o.Upstream,
		upstreamTopic: o.UpstreamTopic,
		events:        o.Events,
		metrics:       o.Metrics,
		startedAt:     time.Now(),
		logger:        o.Logger.With("node", o.Self.GetId()),
		buckets:       newBuckets(cfg.Buckets),
		bufs:          newBufPool(),
		upgrader:      upgrader(cfg.AllowedOrigins),
	}
	// Anyone who reaches the port can fail handshakes as fast as they
	// can connect, and a broker outage fails every client's op 4: a line
	// per event let either flood the log.
	s.upstreamLog = pipeline.NewRateLog(s.logger, slog.LevelError, logEvery)
	s.handshakeLog = pipeline.NewRateLog(s.logger, slog.LevelInfo, logEvery)
	s.originLog = pipeline.NewRateLog(s.logger, slog.LevelInfo, logEvery)
	s.announceLog = pipeline.NewRateLog(s.logger, slog.LevelWarn, logEvery)
	s.delivered = expiring.NewSet(cfg.DedupeTTL)
	s.rounds = newRoomRounds()
	s.order = newOrderer(s, cfg.OrderGapWait)
	s.acker = newAcker(s)
	s.announcer = newAnnouncer(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), logicCallTimeout)
		defer cancel()
		err := s.renew(ctx)
		if err != nil {
			// Reports are up to 50 a second while clients join new rooms.
			s.announceLog.Log("announce new rooms to logic", "err", err)
		}
		return err
	})
	s.limits = newConnLimiter(maxConns(cfg.MaxConns, s.logger), cfg.MaxHandshakesPerIP, s.logger)
	s.disconnectSlots = make(chan struct{}, maxDisconnectCalls)
	s.recoverSlots = make(chan struct{}, maxRecoverCalls)
	s.recoverBounds = defaultRecoverBounds()
	if o.recoverBounds != nil {
		s.recoverBounds = *o.recoverBounds
	}
	s.recoverBytes = newByteBudget(s.recoverBounds.bytes)
	s.recoverLog = pipeline.NewRateLog(s.logger, slog.LevelWarn, logEvery)
	s.paced = make(chan struct{}, cfg.MaxPacedBroadcasts)
	s.pacedCtx, s.stopPaced = context.WithCancel(context.Background())
	if cfg.ParkIdle {
		p, err := newParker()
		if err != nil {
			s.logger.Info("idle connections keep their readers", "reason", err)
		} else {
			s.parker = p
		}
	}
	s.roomOnline.Store(&map[string]int32{})
	s.reported.Store(&map[string]struct{}{})
	s.connIDs.Store(rand.Uint64())
	return s
}

// RegisterGRPC adds the Cloud service to g.
func (s *Stage) RegisterGRPC(g *grpc.Server) { pb.RegisterCloudServer(g, &grpcServer{s: s}) }

// Register reports the node to logic, which is how job finds it.
func (s *Stage) Register(ctx context.Context) error {
	if err := s.renew(ctx); err != nil {
		return fmt.Errorf("register cloud node with logic: %w", err)
	}
	return nil
}

// Run keeps the node's registration and online counts current until ctx
// ends.
func (s *Stage) Run(ctx context.Context) {
	t := time.NewTicker(s.cfg.RenewInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := s.renew(ctx); err != nil && ctx.Err() == nil {
				s.logger.Warn("renew online counts", "err", err)
			}
			s.order.sweep()
		}
	}
}

func (s *Stage) renew(ctx context.Context) error {
	info := s.info()
	ctx, cancel := context.WithTimeout(ctx, logicCallTimeout)
	defer cancel()
	reply, err := s.logic.RenewOnline(ctx, &pb.RenewOnlineReq{Node: info})
	if err != nil {
		return err
	}
	s.renewedAt.Store(time.Now().UnixNano())
	all := reply.AllRoomCount
	if all == nil {
		all = map[string]int32{}
	}
	s.roomOnline.Store(&all)
	reported := make(map[string]struct{}, len(info.RoomCount))
	for room := range info.RoomCount {
		reported[room] = struct{}{}
	}
	s.reported.Store(&reported)
	return nil
}

// announceRooms makes sure the registry lists this node for each room
// before the client is told it joined: job routes a room's pushes only to
// the nodes listed for it, and a node's first member of a room must not
// wait for the next periodic report to get them. Rooms the node already
// reported cost nothing; new ones wait for the next batched report (see
// announcer).
func (s *Stage) announceRooms(rooms []string) {
	reported := *s.reported.Load()
	for _, room := range rooms {
		if _, ok := reported[room]; !ok {
			// A failed report is logged once by the announcer, not by
			// each join that waited for it; the room is in the next one.
			_ = s.announcer.announce()
			return
		}
	}
}

// info describes the node for the registry, with its current counts.
func (s *Stage) info() *pb.NodeInfo {
	info := proto.Clone(s.self).(*pb.NodeInfo)
	info.RoomCount, info.ConnCount, info.IpCount = s.counts()
	info.ReportsRooms = true
	if s.Draining() {
		// Still registered (job delivers to the clients it still has),
		// no longer offered to clients: /im/nodes/weighted lists only
		// nodes with a public host.
		info.Host = ""
	}
	return info
}

// canarySeen records a job's canary, published at publishedUnixNano.
func (s *Stage) canarySeen(publishedUnixNano int64) {
	now := time.Now()
	s.canaryAt.Store(now.UnixNano())
	if publishedUnixNano > 0 {
		s.canaryLag.Store(max(0, now.UnixNano()-publishedUnixNano))
	}
}

// Canary returns how long ago a job's canary last arrived (since the
// node started, if none has) and how long that one took from its publish.
func (s *Stage) Canary() (age, lag time.Duration) {
	at := s.canaryAt.Load()
	if at == 0 {
		return time.Since(s.startedAt), 0
	}
	return time.Since(time.Unix(0, at)), time.Duration(s.canaryLag.Load())
}

// Registered reports whether logic took one of the node's reports within
// the last three renew intervals: past that the registry has dropped the
// node, and job sends it nothing.
func (s *Stage) Registered() bool {
	at := s.renewedAt.Load()
	return at != 0 && time.Since(time.Unix(0, at)) < 3*s.cfg.RenewInterval
}

// Parked is the number of idle connections waiting without a reader.
func (s *Stage) Parked() int { return s.parker.count() }

// Rooms is the number of rooms with a member here, as last reported.
func (s *Stage) Rooms() int { return len(*s.reported.Load()) }

// Leave takes the node out of /im/nodes/weighted and turns it not ready
// (Draining), refusing new clients: the first step of a shutdown, before
// the listeners close, so that clients told to reconnect (1001) are sent
// elsewhere, not back here. Drain calls it; a second call does nothing.
func (s *Stage) Leave(ctx context.Context) {
	s.connMu.Lock()
	was := s.draining
	s.draining = true
	s.connMu.Unlock()
	if was {
		return
	}
	if err := s.renew(ctx); err != nil {
		s.logger.Warn("drain: tell logic this node takes no new clients", "err", err)
	}
}

// Draining reports whether Drain began: the node takes no new client and
// is not ready.
func (s *Stage) Draining() bool {
	s.connMu.RLock()
	defer s.connMu.RUnlock()
	return s.draining
}

// counts returns the node's per-room, connection and client IP counts.
func (s *Stage) counts() (map[string]int32, int32, int32) {
	rooms := map[string]int32{}
	ips := map[string]struct{}{}
	var conns int32
	for _, b := range s.buckets {
		conns += b.counts(rooms, ips)
	}
	return rooms, conns, int32(len(ips))
}

// onlineCount is the room's count as logic last reported it, or this
// node's own count for a room logic has not reported yet.
func (s *Stage) onlineCount(room string) int32 {
	if room == "" {
		return 0
	}
	if n, ok := (*s.roomOnline.Load())[room]; ok {
		return n
	}
	var n int
	for _, b := range s.buckets {
		n += b.roomCount(room)
	}
	return int32(n)
}

// firstDelivery reports whether p's message id was not delivered before,
// and remembers it. Packets without an id are always delivered.
func (s *Stage) firstDelivery(p *pb.Proto) bool {
	return p.GetId() == "" || s.delivered.AddIfAbsent(p.Id)
}

// firstDeliveries keeps the items (one per proto of ps) whose message was
// not delivered before, in place.
func (s *Stage) firstDeliveries(items []outItem, ps []*pb.Proto) []outItem {
	kept := items[:0]
	for i, p := range ps {
		if s.firstDelivery(p) {
			kept = append(kept, items[i])
		}
	}
	return kept
}

// RefusedConns counts the client connections closed at accept for being
// over cloud.max_conns or cloud.max_handshakes_per_ip.
func (s *Stage) RefusedConns() int64 { return s.limits.refused.Load() }

// SlowConsumers counts the clients closed for not reading fast enough.
func (s *Stage) SlowConsumers() int64 { return s.slowConsumers.Load() }

// Listener wraps ln for client connections: accepted sockets get the
// configured kernel buffer sizes, connections over cloud.max_conns or
// cloud.max_handshakes_per_ip are closed at once (see connLimiter), and an accept that fails is retried
// with backoff instead of ending the listener (see retryListener). Both
// ServeTCP and the WebSocket servers accept through it.
func (s *Stage) Listener(ln net.Listener) net.Listener {
	if _, ok := ln.(*retryListener); ok {
		return ln
	}
	if s.cfg.Sndbuf != 0 || s.cfg.Rcvbuf != 0 {
		ln = &bufferedListener{Listener: ln, sndbuf: s.cfg.Sndbuf, rcvbuf: s.cfg.Rcvbuf}
	}
	ln = &capListener{Listener: ln, lim: s.limits}
	return &retryListener{Listener: ln, logger: s.logger.With("listener", ln.Addr().String())}
}

// Bounds of the wait between failed accepts, as net/http's: short enough
// that a passing shortage costs little, long enough that a lasting one
// does not spin.
const (
	minAcceptDelay = 5 * time.Millisecond
	maxAcceptDelay = time.Second
)

// retryListener retries a failed Accept with exponential backoff until it
// succeeds or the listener is closed. An accept fails when the process is
// out of descriptors (EMFILE, ENFILE) or the kernel out of memory
// (ENOBUFS, ENOMEM), which clients can cause: 1,100 unauthenticated
// connections under a 1,024 descriptor limit made ServeTCP return and the
// node stop. None of those is the listener's end, and the connections
// waiting in the backlog are accepted once descriptors free up. net/http
// retries EMFILE and ENFILE but gives up on ENOBUFS and ENOMEM, and logs
// every retry; this logs once when accepting starts failing and once when
// it recovers.
type retryListener struct {
	net.Listener
	logger *slog.Logger
}

func (l *retryListener) Accept() (net.Conn, error) {
	var (
		delay    time.Duration
		failures int
		since    time.Time
	)
	for {
		c, err := l.Listener.Accept()
		if err == nil {
			if failures > 0 {
				l.logger.Info("accepting client connections again", "failed_accepts", failures, "after", time.Since(since).Round(time.Millisecond))
			}
			return c, nil
		}
		if errors.Is(err, net.ErrClosed) {
			return nil, err
		}
		if failures == 0 {
			since = time.Now()
			l.logger.Warn("accepting client connections failed; retrying with backoff until it succeeds", "err", err)
		}
		failures++
		delay = min(max(2*delay, minAcceptDelay), maxAcceptDelay)
		time.Sleep(delay)
	}
}

type bufferedListener struct {
	net.Listener
	sndbuf, rcvbuf int
}

func (l *bufferedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		if l.sndbuf > 0 {
			_ = tc.SetWriteBuffer(l.sndbuf)
		}
		if l.rcvbuf > 0 {
			_ = tc.SetReadBuffer(l.rcvbuf)
		}
	}
	return c, nil
}

// ServeTCP accepts TCP clients until ln is closed. A failed accept is
// retried (see retryListener), never the end of the node.
func (s *Stage) ServeTCP(ln net.Listener) error {
	ln = s.Listener(ln)
	for {
		conn, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("accept tcp: %w", err)
		}
		t := newTCPTransport(conn, s.cfg.MaxBodyBytes, s.bufs)
		if !s.begin() {
			t.Close(closeGoingAway, "server shutting down")
			continue
		}
		go s.serve(t)
	}
}

// WSHandler serves WebSocket clients on /sub, and the demo page on /demo
// with cloud.demo.
func (s *Stage) WSHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/sub", func(w http.ResponseWriter, r *http.Request) {
		if websocket.IsWebSocketUpgrade(r) && !originAllowed(s.upgrader, r) {
			// A page of a site not listed: the browser only says 1006 to
			// its script, so the node says why, once per 10 s.
			s.originLog.Log("websocket refused: its Origin is not this node's and not in cloud.allowed_origins",
				"origin", r.Header.Get("Origin"), "remote", r.RemoteAddr)
			http.Error(w, "origin not allowed: list it in cloud.allowed_origins", http.StatusForbidden)
			return
		}
		ow := &ownReader{ResponseWriter: w, maxBody: s.cfg.MaxBodyBytes}
		conn, err := s.upgrader.Upgrade(ow, r, nil)
		if err != nil {
			s.logger.Debug("websocket upgrade refused", "remote", r.RemoteAddr, "origin", r.Header.Get("Origin"), "err", err)
			return
		}
		conn.SetReadLimit(int64(s.cfg.MaxBodyBytes + wire.HeaderLen))
		t := newWSTransport(conn, ow.br, ow.budget, s.cfg.MaxBodyBytes, s.bufs)
		if !s.begin() {
			t.Close(closeGoingAway, "server shutting down")
			return
		}
		// Serving on a fresh goroutine lets net/http's connection state,
		// the request and the handler's deep stack go: an idle WebSocket
		// then costs about what an idle TCP client does.
		go s.serve(t)
	})
	if s.cfg.Demo {
		mux.Handle("/demo", demoHandler())
		mux.Handle("/demo/", demoHandler())
	}
	return mux
}

// begin counts a new connection in, unless the node is draining.
func (s *Stage) begin() bool {
	s.connMu.RLock()
	defer s.connMu.RUnlock()
	if s.draining {
		return false
	}
	s.conns.Add(1)
	return true
}

// Drain closes every client connection with 1001 once what is queued for
// it has been written, and waits for the connections to end (each telling
// logic its session is gone) or for ctx; then it closes what remains.
// Stop the listeners first: a client accepted during Drain is not drained.
func (s *Stage) Drain(ctx context.Context) error {
	s.Leave(ctx)
	// Paced broadcasts stop: what they have not queued yet would only
	// be refused by connections that are closing.
	s.stopPaced()
	var chs []*channel
	for _, b := range s.buckets {
		chs = b.channels(chs)
	}
	for _, ch := range chs {
		ch.closeAfterFlush()
	}
	done := make(chan struct{})
	go func() {
		s.conns.Wait()
		s.acker.drain() // the clients' last acks, now that none can come
		s.pacedWG.Wait()
		if s.parker != nil {
			s.parker.close() // nothing is parked once every session ended
		}
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	chs = chs[:0]
	for _, b := range s.buckets {
		chs = b.channels(chs)
	}
	for _, ch := range chs {
		ch.close(closeGoingAway, "server shutting down")
	}
	return fmt.Errorf("drain clients: %d still writing at the deadline: %w", len(chs), ctx.Err())
}

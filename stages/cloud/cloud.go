// Package cloud holds client connections (TCP and WebSocket, goim's v2
// protocol): it authenticates them through logic, keeps their rooms and
// operation filters, and writes out the pushes job delivers over gRPC.
package cloud

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"
	"github.com/gorilla/websocket"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/config"
	"imcloud/pipeline"
	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// logicCallTimeout bounds each call to logic made on a client's behalf.
const logicCallTimeout = 5 * time.Second

// Stage is a cloud node.
type Stage struct {
	cfg           config.Cloud
	nodeID        string
	advertise     string
	logic         pb.LogicClient
	upstream      message.Publisher
	upstreamTopic string
	logger        *slog.Logger

	buckets  []*bucket
	upgrader *websocket.Upgrader
	// roomOnline holds the cluster-wide room counts logic last reported.
	roomOnline atomic.Pointer[map[string]int32]

	slowConsumers atomic.Int64

	connMu   sync.RWMutex // orders conns.Add before Drain's Wait
	draining bool
	conns    sync.WaitGroup
}

// Options are a cloud node's collaborators.
type Options struct {
	// NodeID names this node in the registry; AdvertiseAddr is where job
	// reaches its gRPC service.
	NodeID, AdvertiseAddr string
	Logic                 pb.LogicClient
	Upstream              message.Publisher
	UpstreamTopic         string
	Logger                *slog.Logger
}

// New returns a cloud node.
func New(cfg config.Cloud, o Options) *Stage {
	s := &Stage{
		cfg:           cfg,
		nodeID:        o.NodeID,
		advertise:     o.AdvertiseAddr,
		logic:         o.Logic,
		upstream:      o.Upstream,
		upstreamTopic: o.UpstreamTopic,
		logger:        o.Logger.With("node", o.NodeID),
		buckets:       newBuckets(cfg.Buckets),
		upgrader:      upgrader(cfg.AllowedOrigins),
	}
	s.roomOnline.Store(&map[string]int32{})
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
		}
	}
}

func (s *Stage) renew(ctx context.Context) error {
	rooms, conns := s.counts()
	ctx, cancel := context.WithTimeout(ctx, logicCallTimeout)
	defer cancel()
	reply, err := s.logic.RenewOnline(ctx, &pb.RenewOnlineReq{Server: s.nodeID, GrpcAddr: s.advertise, RoomCount: rooms, ConnCount: conns})
	if err != nil {
		return err
	}
	all := reply.AllRoomCount
	if all == nil {
		all = map[string]int32{}
	}
	s.roomOnline.Store(&all)
	return nil
}

// counts returns the node's per-room and total connection counts.
func (s *Stage) counts() (map[string]int32, int32) {
	rooms := map[string]int32{}
	var conns int32
	for _, b := range s.buckets {
		conns += b.counts(rooms)
	}
	return rooms, conns
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

// SlowConsumers counts the clients closed for not reading fast enough.
func (s *Stage) SlowConsumers() int64 { return s.slowConsumers.Load() }

// Listener wraps ln so that accepted client sockets get the configured
// kernel buffer sizes.
func (s *Stage) Listener(ln net.Listener) net.Listener {
	if s.cfg.Sndbuf == 0 && s.cfg.Rcvbuf == 0 {
		return ln
	}
	return &bufferedListener{Listener: ln, sndbuf: s.cfg.Sndbuf, rcvbuf: s.cfg.Rcvbuf}
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

// ServeTCP accepts TCP clients until ln is closed.
func (s *Stage) ServeTCP(ln net.Listener) error {
	ln = s.Listener(ln)
	for {
		conn, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return fmt.Errorf("accept tcp: %w", err)
		}
		t := newTCPTransport(conn, s.cfg.MaxBodyBytes)
		if !s.begin() {
			t.Close(closeGoingAway, "server shutting down")
			continue
		}
		go s.serve(t)
	}
}

// WSHandler serves WebSocket clients on /sub.
func (s *Stage) WSHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/sub", func(w http.ResponseWriter, r *http.Request) {
		conn, err := s.upgrader.Upgrade(w, r, nil)
		if err != nil {
			s.logger.Debug("websocket upgrade refused", "remote", r.RemoteAddr, "origin", r.Header.Get("Origin"), "err", err)
			return
		}
		conn.SetReadLimit(int64(s.cfg.MaxBodyBytes + wire.HeaderLen))
		t := &wsTransport{conn: conn, maxBody: s.cfg.MaxBodyBytes}
		if !s.begin() {
			t.Close(closeGoingAway, "server shutting down")
			return
		}
		// Serving on a fresh goroutine lets net/http's connection state,
		// the request and the handler's deep stack go: an idle WebSocket
		// then costs about what an idle TCP client does.
		go s.serve(t)
	})
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
	s.connMu.Lock()
	s.draining = true
	s.connMu.Unlock()
	var chs []*channel
	for _, b := range s.buckets {
		chs = b.channels(chs)
	}
	for _, ch := range chs {
		ch.closeAfterFlush()
	}
	done := make(chan struct{})
	go func() { s.conns.Wait(); close(done) }()
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

// serve authenticates a connection counted in by begin, then hands it to
// a session goroutine of its own. The handshake's calls into logic grow a
// goroutine's stack to several kilobytes, and a stack is not given back
// while its goroutine lives; the session's goroutine starts small and stays
// small while the client idles. Whatever a client sends, only its own
// connection can end: a panic is logged and closes that connection.
func (s *Stage) serve(t transport) {
	remote := t.RemoteAddr().String()
	handedOff := false
	defer func() {
		if r := recover(); r != nil {
			s.logger.Error("panic in client handshake; connection closed", "remote", remote, "panic", r, "stack", string(debug.Stack()))
			t.Close(closeInternal, "internal error")
		}
		if !handedOff {
			s.conns.Done()
		}
	}()
	ch, err := s.handshake(t)
	if err != nil {
		s.logger.Info("handshake failed", "remote", remote, "err", err)
		return
	}
	handedOff = true
	go func() {
		defer s.conns.Done()
		s.session(ch, remote)
	}()
}

// session runs an authenticated connection until it ends.
func (s *Stage) session(ch *channel, remote string) {
	b := bucketFor(s.buckets, ch.key)
	if old := b.put(ch); old != nil {
		old.close(closeReplaced, "replaced by a new connection")
	}
	reply := authReply{Mid: ch.mid, Key: ch.key, Rooms: ch.roomList(), Heartbeat: int64(s.cfg.HeartbeatInterval / time.Second)}
	ch.reply(outItem{pkt: wire.Encode(wire.OpAuthReply, authSeq, reply.encode())})
	s.logger.Debug("client connected", "mid", ch.mid, "key", ch.key, "remote", remote)

	err := s.readLoopRecovering(ch, b)
	ch.close(closeCode(err))
	if !b.del(ch) {
		// The session now belongs to the connection that replaced this one.
		s.logger.Debug("replaced client disconnected", "mid", ch.mid, "key", ch.key)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), logicCallTimeout)
	defer cancel()
	if _, derr := s.logic.Disconnect(ctx, &pb.DisconnectReq{Mid: ch.mid, Key: ch.key, Server: s.nodeID}); derr != nil {
		s.logger.Warn("report disconnect to logic", "mid", ch.mid, "key", ch.key, "err", derr)
	}
	s.logger.Debug("client disconnected", "mid", ch.mid, "key", ch.key, "err", err)
}

// Why a client's connection was closed.
var (
	errProtocol    = errors.New("protocol error")
	errRateLimited = errors.New("upstream rate limit exceeded")
	errInternal    = errors.New("internal error")
)

// authSeq is the sequence of the op 8 reply: goim answers auth with 0.
const authSeq = 0

// closeCode picks the close frame for why a connection ended.
func closeCode(err error) (int, string) {
	switch {
	case isTooLarge(err):
		return closeTooBig, "packet too large"
	case errors.Is(err, errProtocol), errors.Is(err, wire.ErrHeaderLen), errors.Is(err, wire.ErrShort):
		return closeProtocol, "protocol error"
	case errors.Is(err, errRateLimited):
		return closeRateLimited, "rate limit exceeded"
	case errors.Is(err, errInternal):
		return closeInternal, "internal error"
	default:
		return closeNormal, ""
	}
}

// handshake reads the auth packet within the handshake timeout and has
// logic authenticate it. Failure closes the connection without op 8.
func (s *Stage) handshake(t transport) (*channel, error) {
	_ = t.SetReadDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	ps, err := t.Read()
	if err != nil {
		t.Close(closeCode(err))
		return nil, fmt.Errorf("read auth packet: %w", err)
	}
	if len(ps) != 1 || ps[0].Op != wire.OpAuth {
		t.Close(closeProtocol, "first packet must be auth")
		return nil, fmt.Errorf("%w: first packet is not auth", errProtocol)
	}
	ctx, cancel := context.WithTimeout(context.Background(), logicCallTimeout)
	defer cancel()
	reply, err := s.logic.Connect(ctx, &pb.ConnectReq{Server: s.nodeID, Token: ps[0].Body, RemoteAddr: t.RemoteAddr().String()})
	if err != nil {
		if status.Code(err) == codes.Unauthenticated {
			t.Close(closeAuthFailed, "authentication failed")
		} else {
			t.Close(closeTryAgain, "authentication unavailable, try again later")
		}
		return nil, fmt.Errorf("connect to logic: %w", err)
	}
	ch := newChannel(t, s.cfg.SendQueue, &s.slowConsumers, s.logger)
	ch.mid, ch.key = reply.Mid, reply.Key
	ch.rooms = uniq(reply.Rooms)
	if len(reply.Accepts) > 0 {
		ch.setAccepts(reply.Accepts, true)
	}
	return ch, nil
}

func uniq(ss []string) []string {
	out := make([]string, 0, len(ss))
	seen := map[string]bool{}
	for _, s := range ss {
		if s != "" && !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}

// readLoopRecovering runs readLoop, turning a panic into errInternal so
// that the connection is still unregistered and reported gone.
func (s *Stage) readLoopRecovering(ch *channel, b *bucket) (err error) {
	defer func() {
		if r := recover(); r != nil {
			s.logger.Error("panic serving client; connection closed", "key", ch.key, "panic", r, "stack", string(debug.Stack()))
			err = fmt.Errorf("%w: %v", errInternal, r)
		}
	}()
	return s.readLoop(ch, b)
}

func (s *Stage) readLoop(ch *channel, b *bucket) error {
	// Two missed heartbeats close the connection.
	idle := 2*s.cfg.HeartbeatInterval + s.cfg.HandshakeTimeout
	for {
		_ = ch.t.SetReadDeadline(time.Now().Add(idle))
		ps, err := ch.t.Read()
		for _, p := range ps {
			if herr := s.handle(ch, b, p); herr != nil {
				return herr
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) || websocket.IsCloseError(err, websocket.CloseNormalClosure, websocket.CloseGoingAway) {
				return nil
			}
			return err
		}
	}
}

func (s *Stage) handle(ch *channel, b *bucket, p wire.Packet) error {
	switch p.Op {
	case wire.OpHeartbeat:
		var body [4]byte
		binary.BigEndian.PutUint32(body[:], uint32(s.onlineCount(ch.firstRoom())))
		ch.reply(outItem{pkt: wire.Encode(wire.OpHeartbeatReply, p.Seq, body[:])})
		ctx, cancel := context.WithTimeout(context.Background(), logicCallTimeout)
		_, err := s.logic.Heartbeat(ctx, &pb.HeartbeatReq{Mid: ch.mid, Key: ch.key, Server: s.nodeID})
		cancel()
		if err != nil {
			s.logger.Warn("renew session with logic", "key", ch.key, "err", err)
		}
	case wire.OpSendMsg:
		if !ch.allowUpstream(s.upstreamLimit(), s.cfg.UpstreamBurst) {
			return errRateLimited
		}
		if err := s.publishUpstream(ch, p); err != nil {
			s.logger.Error("publish upstream message", "key", ch.key, "err", err)
			return fmt.Errorf("publish upstream: %w", err)
		}
		ch.reply(outItem{pkt: wire.Encode(wire.OpSendMsgReply, p.Seq, nil)})
	case wire.OpChangeRoom:
		room := strings.TrimSpace(string(p.Body))
		b.changeRoom(ch, room)
		ch.reply(outItem{pkt: wire.Encode(wire.OpChangeRoomReply, p.Seq, []byte(room))})
	case wire.OpSub, wire.OpUnsub:
		ops, ok := parseOps(p.Body)
		if !ok {
			return fmt.Errorf("%w: operation list %q", errProtocol, p.Body)
		}
		ch.setAccepts(ops, p.Op == wire.OpSub)
		ch.reply(outItem{pkt: wire.Encode(p.Op+1, p.Seq, p.Body)})
	case wire.OpAuth:
		return fmt.Errorf("%w: auth after authentication", errProtocol)
	default:
		s.logger.Debug("ignoring unknown operation", "key", ch.key, "op", p.Op)
	}
	return nil
}

func (s *Stage) upstreamLimit() rate.Limit {
	if s.cfg.UpstreamRate == 0 {
		return rate.Inf
	}
	return rate.Limit(s.cfg.UpstreamRate)
}

func (s *Stage) publishUpstream(ch *channel, p wire.Packet) error {
	id := uuid.NewString()
	msg := message.NewMessage(id, append([]byte(nil), p.Body...))
	msg.Metadata.Set(pipeline.MetaMessageID, id)
	msg.Metadata.Set(pipeline.MetaMid, strconv.FormatInt(ch.mid, 10))
	msg.Metadata.Set(pipeline.MetaKey, ch.key)
	msg.Metadata.Set(pipeline.MetaSeq, strconv.FormatInt(int64(p.Seq), 10))
	msg.Metadata.Set(pipeline.MetaRooms, strings.Join(ch.roomList(), ","))
	return s.upstream.Publish(s.upstreamTopic, msg)
}

package cloud

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"
	"github.com/gorilla/websocket"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/pipeline"
	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

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
	ch, tops, err := s.handshake(t)
	if err != nil {
		s.handshakeFailed(remote, err)
		return
	}
	handedOff = true
	go s.session(ch, remote, tops) // ends the session's count in conns
}

// session runs an authenticated connection until it ends; tops are its
// streams' positions from logic, where their order starts.
func (s *Stage) session(ch *channel, remote string, tops []*pb.StreamPos) {
	b := bucketFor(s.buckets, ch.key)
	r := &reader{s: s, ch: ch, b: b, id: ch.conn, last: time.Now()}
	// Counted in here, out in endSession, which every session reaches.
	s.metrics.Opened(transportName(ch.t))
	defer func() {
		// Only what comes before the reader runs can panic here: the
		// reader recovers its own. The connection ends, not the node.
		if p := recover(); p != nil {
			s.logger.Error("panic starting client session; connection closed", "key", ch.key, "panic", p, "stack", string(debug.Stack()))
			r.end(fmt.Errorf("%w: %v", errInternal, p))
		}
	}()
	// The auth reply is queued before the connection is visible to
	// pushes, and written once it is in its bucket and its rooms are
	// announced: a push that comes the moment it joins (job retrying a
	// backlog as a key reconnects) is queued behind op 8, and a client
	// that has op 8 gets what is pushed to its key and rooms.
	reply := authReply{Mid: ch.mid, Key: ch.key, Rooms: ch.roomList(), Heartbeat: int64(s.cfg.HeartbeatInterval / time.Second)}
	if ch.optedIn {
		// Positioned pushes are held from now until its op 21.
		ch.rec = &recovering{max: s.recoverBounds.held, starts: ch.startPositions(tops)}
		reply.Recover, reply.Acks, reply.Streams = true, ch.acks, ch.rec.starts
	}
	ch.held = true // no one else has ch yet
	ch.reply(outItem{pkt: wire.Encode(wire.OpAuthReply, authSeq, reply.encode())})
	// Its streams are ordered before pushes can find it.
	s.order.start(ch, ch.roomList(), tops)
	old, buried := b.put(ch, time.Now())
	if old != nil {
		old.close(closeReplaced, "replaced by a new connection")
	}
	if buried {
		// A newer connection of the key registered on another node while
		// this one was in its handshake, and logic closed this one then.
		// It never took the key: it ends as a replaced connection, with
		// no Disconnect that could touch the newer session.
		s.logger.Debug("client replaced on another node during its handshake", "mid", ch.mid, "key", ch.key, "remote", remote)
		ch.close(closeReplaced, "replaced by a connection on another node")
		r.end(nil)
		return
	}
	// Rooms new to the node are reported to logic before op 8 goes out,
	// so that pushes to them are routed here by the time the client
	// knows it is in them.
	s.announceRooms(ch.roomList())
	// connect goes out before anything is written to the client, so that
	// it precedes every delivered event of the connection.
	s.emitConnect(ch)
	ch.release()
	if ch.optedIn {
		s.startHold(ch)
	}
	s.logger.Debug("client connected", "mid", ch.mid, "key", ch.key, "remote", remote)

	if s.parker != nil {
		ch.setWake(func() { s.parker.wake(r.id) })
	}
	r.run(false)
}

// endSession unregisters a connection whose reader ended and tells logic
// the session is gone. The reader calls it once per session (see
// reader.end): it counts the session out of conns.
func (s *Stage) endSession(ch *channel, b *bucket, err error) {
	defer s.conns.Done()
	ch.close(closeCode(err))
	s.metrics.Ended(transportName(ch.t))
	s.metrics.Closed(ch.closedWith())
	s.emitDisconnect(ch)
	if !b.del(ch) {
		// The session now belongs to the connection that replaced this one.
		s.logger.Debug("replaced client disconnected", "mid", ch.mid, "key", ch.key)
		return
	}
	// A mass disconnect (a network blip, the load balancer restarting)
	// would otherwise make one call per client at once: each call grows
	// its goroutine's stack and takes a stream in logic, and 19,000
	// clients leaving together doubled the node's memory.
	s.disconnectSlots <- struct{}{}
	defer func() { <-s.disconnectSlots }()
	ctx, cancel := context.WithTimeout(context.Background(), logicCallTimeout)
	defer cancel()
	if _, derr := s.logic.Disconnect(ctx, &pb.DisconnectReq{Mid: ch.mid, Key: ch.key, Server: s.nodeID, Conn: ch.conn}); derr != nil {
		s.logger.Warn("report disconnect to logic", "mid", ch.mid, "key", ch.key, "err", derr)
	}
	s.logger.Debug("client disconnected", "mid", ch.mid, "key", ch.key, "err", err)
}

// Why a client's connection was closed.
var (
	errProtocol     = errors.New("protocol error")
	errRateLimited  = errors.New("rate limit exceeded")
	errInternal     = errors.New("internal error")
	errTooManyRooms = errors.New("too many rooms")
	errUpstream     = errors.New("upstream unavailable")
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
	case errors.Is(err, errRoomNotAllowed):
		return closeForbidden, "room not allowed"
	case errors.Is(err, errOpNotAllowed):
		return closeForbidden, "operation not allowed"
	case errors.Is(err, errTooManyRooms):
		return closeForbidden, "too many rooms"
	case errors.Is(err, errTooManyOps):
		return closePolicy, "too many operations"
	case errors.Is(err, errUpstream):
		return closeTryAgain, "upstream unavailable, try again later"
	case errors.Is(err, errInternal):
		return closeInternal, "internal error"
	case readTimeout(err):
		// A normal close, but named: the disconnect event tells a client
		// that went silent (no heartbeat, no auth in time) from one that
		// left.
		return closeNormal, "read deadline passed: no packet in time"
	default:
		return closeNormal, ""
	}
}

// readTimeout reports a read deadline that passed. gorilla/websocket
// wraps it in an error of its own that does not unwrap to
// os.ErrDeadlineExceeded, but says Timeout().
func readTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// handshake reads the auth packet within the handshake timeout and has
// logic authenticate it. Failure closes the connection without op 8.
func (s *Stage) handshake(t transport) (*channel, []*pb.StreamPos, error) {
	_ = t.SetReadDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	ps, err := t.Read()
	if err != nil {
		t.Close(closeCode(err))
		return nil, nil, fmt.Errorf("read auth packet: %w", err)
	}
	if len(ps) != 1 || ps[0].Op != wire.OpAuth {
		t.Close(closeProtocol, "first packet must be auth")
		return nil, nil, fmt.Errorf("%w: first packet is not auth", errProtocol)
	}
	ctx, cancel := context.WithTimeout(context.Background(), logicCallTimeout)
	defer cancel()
	conn := s.connID()
	reply, err := s.logic.Connect(ctx, &pb.ConnectReq{Server: s.nodeID, Token: ps[0].Body, RemoteAddr: t.RemoteAddr().String(), Conn: conn})
	if err != nil {
		switch status.Code(err) {
		case codes.Unauthenticated:
			t.Close(closeAuthFailed, "authentication failed")
		case codes.ResourceExhausted:
			// logic.connect_rate or logic.max_sessions_per_mid: the client
			// backs off on 4029 rather than reconnecting at once.
			t.Close(closeRateLimited, "too many connections, try again later")
		default:
			t.Close(closeTryAgain, "authentication unavailable, try again later")
		}
		return nil, nil, fmt.Errorf("connect to logic: %w", err)
	}
	rooms := uniq(reply.Rooms)
	if err := validReply(reply, rooms); err != nil {
		// Logic checks what it grants; this keeps a bad grant from an
		// older or broken logic out of this node's room counts.
		t.Close(closeAuthFailed, "authentication failed")
		return nil, nil, fmt.Errorf("connect reply from logic: %w", err)
	}
	if len(rooms) > s.cfg.MaxRooms {
		t.Close(closeCode(errTooManyRooms))
		s.forget(reply.Mid, reply.Key, conn)
		return nil, nil, fmt.Errorf("%w: the token joins %d rooms, cloud.max_rooms is %d", errTooManyRooms, len(rooms), s.cfg.MaxRooms)
	}
	ch := newChannel(t, s.cfg.SendQueue, s.cfg.SendQueueBytes, &s.slowConsumers, s.logger)
	ch.metrics = s.metrics
	ch.mid, ch.key, ch.conn = reply.Mid, reply.Key, conn
	ch.ip, _, _ = net.SplitHostPort(t.RemoteAddr().String())
	ch.rooms = rooms
	ch.optedIn, ch.acks, ch.acked = reply.Recover, reply.Acks, reply.Acked
	// The token's own accepts first: they are what the grants allow.
	if len(reply.Accepts) > 0 {
		_ = ch.setAccepts(reply.Accepts, true) // no grants yet: nothing to refuse
	}
	ch.grants = &grants{
		rooms:          slices.Concat(rooms, reply.RoomGrants), // a copy: op 12 rewrites ch.rooms in place
		anyRoom:        reply.AnyRoom,
		accepts:        reply.Accepts,
		anyAccept:      reply.AnyAccept,
		maxAccepts:     s.cfg.MaxAccepts,
		heartbeatEvery: s.heartbeatEvery(reply.SessionTtl),
	}
	ch.ackTrack = newConnAcks(reply)
	// The session's own Connect counts as its first heartbeat.
	ch.heartbeatAt = time.Now().UnixNano()
	t.admitted(newClientBudget(s.cfg.ClientRate, s.cfg.ClientBurst, s.cfg.MaxBodyBytes), func() bool {
		return ch.allowPacket(time.Now(), s.cfg.ClientRate, s.cfg.ClientBurst)
	})
	return ch, reply.Tops, nil
}

// heartbeatEvery is the least time between a client's heartbeats forwarded
// to logic: a third of logic's session TTL, so that two may be lost, or
// half the heartbeat interval when logic does not say. Forwarding every
// one let a client flooding op 2 (11,000/s) make as many registry writes.
func (s *Stage) heartbeatEvery(sessionTTLSeconds int64) time.Duration {
	if sessionTTLSeconds > 0 {
		return time.Duration(sessionTTLSeconds) * time.Second / 3
	}
	return s.cfg.HeartbeatInterval / 2
}

// validReply checks the strings logic granted before any reaches a
// registry, a log line or protobuf.
func validReply(reply *pb.ConnectReply, rooms []string) error {
	if err := wire.ValidKey(reply.Key); err != nil {
		return err
	}
	for _, r := range rooms {
		if err := wire.ValidRoom(r); err != nil {
			return err
		}
	}
	for _, g := range reply.RoomGrants {
		if err := wire.ValidRoomGrant(g); err != nil {
			return err
		}
	}
	return nil
}

// connID names a new connection; 0 is never used, it means "not named"
// to logic (an older node).
func (s *Stage) connID() uint64 {
	for {
		if id := s.connIDs.Add(1); id != 0 {
			return id
		}
	}
}

// forget tells logic that a session it registered in Connect was refused
// here.
func (s *Stage) forget(mid int64, key string, conn uint64) {
	ctx, cancel := context.WithTimeout(context.Background(), logicCallTimeout)
	defer cancel()
	if _, err := s.logic.Disconnect(ctx, &pb.DisconnectReq{Mid: mid, Key: key, Server: s.nodeID, Conn: conn}); err != nil {
		s.logger.Warn("report refused session to logic", "mid", mid, "key", key, "err", err)
	}
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

// reader reads one session's packets until the connection ends. Between
// packets an idle connection is parked (see parker): its goroutine ends,
// and a new one continues when the client sends, the connection is
// closed or its heartbeat deadline passes. Exactly one goroutine owns the
// reader at a time: ownership passes only through the parker, whose take
// hands a parked connection's resume to one caller.
type reader struct {
	s          *Stage
	ch         *channel
	b          *bucket
	id         uint64      // the parker's key for this connection
	registered bool        // the socket was registered with the parker
	last       time.Time   // when the client last sent a packet
	timer      *time.Timer // wakes a parked reader at its heartbeat deadline
	ended      sync.Once   // the session is ended once, whatever ends it
}

// minPark is the least time left before the heartbeat deadline for a
// connection to be parked; closer to it, a blocking read times it out.
const minPark = time.Second

// run reads until the connection parks or ends, and ends the session;
// woken says the parker resumed it.
func (r *reader) run(woken bool) {
	if r.timer != nil {
		r.timer.Stop()
	}
	parked, err := r.readRecovering(woken)
	if !parked {
		r.end(err)
	}
}

// end ends the session: unregistered, counted out and reported to logic
// once, even if two paths were ever to end it.
func (r *reader) end(err error) {
	r.ended.Do(func() {
		if r.timer != nil {
			r.timer.Stop()
		}
		r.s.endSession(r.ch, r.b, err)
	})
}

// readRecovering runs read, turning a panic into errInternal so that the
// connection is still unregistered and reported gone.
func (r *reader) readRecovering(woken bool) (parked bool, err error) {
	defer func() {
		if p := recover(); p != nil {
			r.s.logger.Error("panic serving client; connection closed", "key", r.ch.key, "panic", p, "stack", string(debug.Stack()))
			parked, err = false, fmt.Errorf("%w: %v", errInternal, p)
		}
	}()
	return r.read(woken)
}

func (r *reader) read(woken bool) (bool, error) {
	// Two missed heartbeats close the connection.
	idle := 2*r.s.cfg.HeartbeatInterval + r.s.cfg.HandshakeTimeout
	// A reader woken from parking reads first: what woke it is waiting.
	for ; ; woken = false {
		if !woken && r.park(idle) {
			return true, nil
		}
		_ = r.ch.t.SetReadDeadline(r.last.Add(idle))
		ps, err := r.ch.t.Read()
		if len(ps) > 0 {
			r.last = time.Now()
		}
		for _, p := range ps {
			if herr := r.s.handle(r.ch, r.b, p); herr != nil {
				return false, herr
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) || websocket.IsCloseError(err, websocket.CloseNormalClosure, websocket.CloseGoingAway) {
				return false, nil
			}
			return false, err
		}
	}
}

// park hands the connection to the parker when nothing is buffered, and
// reports whether it did; the caller's goroutine must then end without
// touching r's state, which another goroutine may already be running (s,
// ch and id never change).
func (r *reader) park(idle time.Duration) bool {
	if r.s.parker == nil {
		return false
	}
	sc, ok := r.ch.t.idleConn()
	if !ok {
		return false
	}
	left := time.Until(r.last.Add(idle))
	if left < minPark {
		return false
	}
	// Everything r needs is set before the park is visible.
	first := !r.registered
	r.registered = true
	if r.timer == nil {
		r.timer = time.AfterFunc(left, func() { r.s.parker.wake(r.id) })
	} else {
		r.timer.Reset(left)
	}
	if !r.s.parker.park(sc, r.id, first, func() { r.run(true) }) {
		// Not handed off: this goroutine still owns r.
		r.timer.Stop()
		r.registered = !first
		return false
	}
	// A close that came before the park was registered found nothing to
	// wake; closing the socket removed it from the epoll set.
	if r.ch.isClosed() {
		r.s.parker.wake(r.id)
	}
	return true
}

// handle serves one client packet. Every packet costs a token of the
// connection's bucket (cloud.client_rate): only op 4 was limited once, and
// one client sent 11,000 heartbeats/s, each a registry write in logic.
func (s *Stage) handle(ch *channel, b *bucket, p wire.Packet) error {
	now := time.Now()
	if !ch.allowPacket(now, s.cfg.ClientRate, s.cfg.ClientBurst) {
		return fmt.Errorf("%w: more than %v packets/s", errRateLimited, s.cfg.ClientRate)
	}
	if ch.optedIn && p.Op != wire.OpRecover && p.Op != wire.OpChangeRoom && !ch.recoverBegun.Load() {
		// Any packet but op 12 ends the hold as an op 21 naming no
		// stream would: the client has nothing to recover.
		_ = s.beginRecovery(ch, nil, 0, false)
	}
	switch p.Op {
	case wire.OpRecover:
		if !ch.optedIn {
			return fmt.Errorf("%w: op 21 from a connection that did not opt in", errProtocol)
		}
		streams, err := wire.DecodeRecoverRequest(p.Body)
		if err != nil {
			return fmt.Errorf("%w: %w", errProtocol, err)
		}
		return s.beginRecovery(ch, streams, p.Seq, true)
	case wire.OpAck:
		// The ack hook: stages/cloud/ack.go.
		if !ch.optedIn {
			return fmt.Errorf("%w: op 23 from a connection that did not opt in", errProtocol)
		}
		return s.handleAck(ch, p.Body)
	case wire.OpHeartbeat:
		var body [4]byte
		binary.BigEndian.PutUint32(body[:], uint32(s.onlineCount(ch.firstRoom())))
		ch.reply(outItem{pkt: wire.Encode(wire.OpHeartbeatReply, p.Seq, body[:])})
		if !ch.heartbeatDue(now) {
			return nil
		}
		ctx, cancel := context.WithTimeout(context.Background(), logicCallTimeout)
		_, err := s.logic.Heartbeat(ctx, &pb.HeartbeatReq{Mid: ch.mid, Key: ch.key, Server: s.nodeID, Conn: ch.conn})
		cancel()
		if err != nil {
			s.logger.Warn("renew session with logic", "key", ch.key, "err", err)
		}
	case wire.OpSendMsg:
		if s.cfg.UpstreamRate != 0 && !ch.allowUpstream(time.Now(), s.cfg.UpstreamRate, s.cfg.UpstreamBurst) {
			return fmt.Errorf("%w: op 4 over cloud.upstream_rate", errRateLimited)
		}
		if err := s.publishUpstream(ch, p); err != nil {
			s.upstreamFailed(ch, err)
			return fmt.Errorf("%w: publish: %w", errUpstream, err)
		}
		s.metrics.Upstream()
		ch.reply(outItem{pkt: wire.Encode(wire.OpSendMsgReply, p.Seq, nil)})
	case wire.OpChangeRoom:
		// op 12 changes the connection's one room (goim), so a connection
		// is never in more rooms than its token joined, or one.
		room := strings.TrimSpace(string(p.Body))
		if room != "" {
			if err := wire.ValidRoom(room); err != nil {
				return fmt.Errorf("%w: op 12: %w", errProtocol, err)
			}
			if !ch.roomAllowed(room) {
				return fmt.Errorf("%w: op 12", errRoomNotAllowed)
			}
			// A room new to the node is ordered from logic's top.
			s.order.joinRoom(room)
		}
		b.changeRoom(ch, room)
		if room != "" {
			s.announceRooms([]string{room})
		}
		ch.reply(outItem{pkt: wire.Encode(wire.OpChangeRoomReply, p.Seq, []byte(room))})
	case wire.OpSub, wire.OpUnsub:
		ops, ok := parseOps(p.Body)
		if !ok {
			return fmt.Errorf("%w: operation list is not comma-separated numbers", errProtocol)
		}
		if err := ch.setAccepts(ops, p.Op == wire.OpSub); err != nil {
			return fmt.Errorf("op %d: %w", p.Op, err)
		}
		ch.reply(outItem{pkt: wire.Encode(p.Op+1, p.Seq, p.Body)})
	case wire.OpAuth:
		return fmt.Errorf("%w: auth after authentication", errProtocol)
	default:
		s.logger.Debug("ignoring unknown operation", "key", ch.key, "op", p.Op)
	}
	return nil
}

// upstreamFailed counts an op 4 message the broker did not take; the
// client is closed with 1013 and may resend it.
func (s *Stage) upstreamFailed(ch *channel, err error) {
	n := s.upstreamFailures.Add(1)
	s.upstreamLog.Log("publish upstream message; client closed with 1013", "key", ch.key, "failures", n, "err", err)
}

// handshakeFailed counts a connection that did not authenticate.
func (s *Stage) handshakeFailed(remote string, err error) {
	s.metrics.HandshakeFailed(handshakeReason(err))
	n := s.handshakeFailures.Add(1)
	s.handshakeLog.Log("handshake failed", "remote", remote, "err", err, "failures", n)
}

// logEvery spaces the lines of a rate-limited log.
const logEvery = 10 * time.Second

// HandshakeFailures counts the connections that did not authenticate.
func (s *Stage) HandshakeFailures() int64 { return s.handshakeFailures.Load() }

// UpstreamFailures counts the op 4 messages the broker did not take.
func (s *Stage) UpstreamFailures() int64 { return s.upstreamFailures.Load() }

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

// handshakeReason names why a handshake failed, from a closed set: the
// label of imcloud_cloud_handshake_failures_total.
func handshakeReason(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, errProtocol):
		return "protocol"
	case errors.Is(err, errTooManyRooms):
		return "too_many_rooms"
	case status.Code(err) == codes.Unauthenticated:
		return "unauthenticated"
	case status.Code(err) == codes.ResourceExhausted:
		return "rate_limited"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case status.Code(err) != codes.Unknown:
		return "logic_unavailable"
	}
	return "closed"
}

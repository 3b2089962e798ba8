package cloud

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"imcloud/pipeline/metrics"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"imcloud/pipeline"
	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// outItem is one queued packet. Push packets are shared by every recipient
// and get this connection's delivery sequence written in as they go out;
// replies keep the client's sequence.
type outItem struct {
	pkt  []byte
	op   int32 // a push's operation, which the client's accepts filter
	push bool
	// written, when set, is called once the packet was written to the
	// socket (the "delivered" event).
	written func()
	// sp is where a positioned push sits in its stream: a connection
	// that opted in gets it as op 20 (see streamItem); nil for everything
	// else, which every connection gets as pkt.
	sp *streamItem
}

// streamItem is a positioned push's stream, epoch and position. Its op 20
// packet is encoded once, by the first opted-in recipient, and shared by
// every other: the frame differs per stream, not per connection.
type streamItem struct {
	stream, epoch string
	pos           uint64
	once          sync.Once
	pkt           []byte
}

// packet is it's op 20 packet; it's own (business) packet when the fields
// do not fit op 20, which only a broken logic would give.
func (si *streamItem) packet(it *outItem) []byte {
	si.once.Do(func() {
		body := it.pkt[wire.HeaderLen:]
		b, err := wire.AppendStreamMsg(make([]byte, 0, wire.StreamMsgSize(si.stream, si.epoch, body)), 0, si.stream, si.epoch, si.pos, it.op, body)
		if err != nil {
			b = it.pkt
		}
		si.pkt = b
	})
	return si.pkt
}

// Close codes sent to WebSocket clients.
const (
	closeNormal       = 1000
	closeGoingAway    = 1001
	closeProtocol     = 1002
	closeTooBig       = 1009
	closePolicy       = 1008 // a per-connection limit (operations subscribed)
	closeInternal     = 1011
	closeTryAgain     = 1013
	closeSlowConsumer = 4008
	closeReplaced     = 4009
	closeRateLimited  = 4029
	closeAuthFailed   = 4401
	closeForbidden    = 4403 // a room or operation the token does not grant
	// closeRecoverAgain: a recovery could not keep its promise (more live
	// messages came meanwhile than a connection may hold, or history
	// changed under it): reconnect and recover again from the positions
	// received, which loses nothing.
	closeRecoverAgain = 4503
)

// keptQueue is the queue capacity an idle connection keeps, sparing the
// allocation of a new queue for every message of a steady trickle.
const keptQueue = 4

// maxWriteBatch bounds how many packets go out in one write (one op 9
// frame on WebSocket), keeping frames a client must buffer moderate.
const maxWriteBatch = 128

// channel is one authenticated client connection.
//
// It has no writer goroutine while idle: the first packet queued starts
// one, which writes everything pending in as few writes as it can and ends
// when the queue is empty. Nor, on Linux with cloud.park_idle, a reader:
// once nothing is buffered the reader hands the socket to the parker (an
// epoll set, park_linux.go) and ends, and a new one starts when the client
// sends, the connection is closed or its heartbeat deadline passes. An idle
// connection so costs no goroutine, and no queue beyond keptQueue slots; a
// TLS (wss) connection, another OS, or a parker that could not be created
// keeps its reader blocked in a read, one goroutine.
type channel struct {
	mid    int64
	key    string
	conn   uint64 // names the connection to the parker and in logic's registry
	ip     string
	t      transport
	logger *slog.Logger
	limit  int           // packets queued before the client is a slow consumer
	slow   *atomic.Int64 // the node's count of slow consumers closed
	// metrics records socket writes; nil records nothing.
	metrics *metrics.Cloud
	seq     atomic.Int32
	// limitBytes bounds the bytes queued: counting packets alone let a
	// client that stopped reading pin 1024 echoed 4 KB replies (~4 MB).
	limitBytes int
	grants     *grants // what op 12 and op 14 may add; set at handshake

	// ackTrack is what an op 23 may acknowledge (ack.go); nil when the
	// client did not opt in. Set at handshake.
	ackTrack *connAcks

	mu        sync.Mutex // guards everything below
	rooms     []string
	acceptOps map[int32]struct{} // nil accepts every operation
	queue     []outItem
	queued    int  // bytes in queue
	writing   bool // a flush goroutine owns the write side
	// held keeps what is queued unwritten until release: a connection's
	// auth reply is queued before it joins its bucket, so that it goes
	// out first, and written after, so that a client that has op 8 is in
	// its rooms.
	held     bool
	draining bool // close with 1001 once the queue is written
	closed   bool
	upstream tokenBucket // op 4 messages, on top of ops
	wake     func()      // resumes a parked reader; nil when not parking
	ops      tokenBucket // every packet the client sends
	// heartbeatAt is when a heartbeat was last forwarded to logic (unix
	// nanoseconds); later ones within heartbeatEvery are answered only.
	heartbeatAt int64
	// announced: the connect event went out, so disconnect goes too;
	// closeCode and closeReason are the first close's, for it.
	announced   bool
	closeCode   int
	closeReason string

	// Positioned delivery (issue 12), for a connection that opted in.
	// rec is set from the handshake until its recovery ends: positioned
	// pushes are held there meanwhile. floors are, per stream, the
	// position at or below which nothing is sent again (what recovery
	// sent, or where op 8 said the stream starts). space, when set, is
	// signalled when the writer takes the queue (sendRecovered waits).
	rec    *recovering
	floors map[string]wire.StreamPos
	space  chan struct{}

	// Set at handshake, read only after.
	optedIn bool          // ConnectReply.recover: op 20, 21, 22 and 23
	acks    bool          // ConnectReply.acks
	acked   *pb.StreamPos // ConnectReply.acked
	// recoverBegun: op 21 came, or the hold ended as if it had.
	recoverBegun atomic.Bool
}

// grants is what a connection's token lets op 12 and op 14 add. It is set
// once at handshake and read only after.
type grants struct {
	rooms     []string // exact rooms and patterns ("live://*"); see wire.RoomGranted
	anyRoom   bool
	accepts   []int32 // the token's accepts; empty: any operation
	anyAccept bool
	// maxAccepts bounds the operations subscribed at once.
	maxAccepts int
	// heartbeatEvery is the least time between heartbeats forwarded to
	// logic.
	heartbeatEvery time.Duration
}

// Why op 12 or op 14 is refused.
var (
	errRoomNotAllowed = errors.New("room not allowed")
	errOpNotAllowed   = errors.New("operation not allowed")
	errTooManyOps     = errors.New("too many operations subscribed")
)

// roomAllowed reports whether op 12 may join room.
func (c *channel) roomAllowed(room string) bool {
	g := c.grants
	return g != nil && (g.anyRoom || wire.RoomGranted(g.rooms, room))
}

// tokenBucket is a rate limiter small enough to sit in every connection
// (16 bytes; a rate.Limiter is 80 and an allocation). Guarded by the
// channel's mu.
type tokenBucket struct {
	tokens float64
	last   int64 // unix nanoseconds of the last refill; 0: full
}

// allow takes one token at now, refilled at perSec up to burst.
func (b *tokenBucket) allow(now int64, perSec float64, burst int) bool {
	if b.last == 0 {
		b.tokens = float64(burst)
	} else if elapsed := now - b.last; elapsed > 0 {
		b.tokens = min(float64(burst), b.tokens+float64(elapsed)*perSec/1e9)
	}
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// allowPacket reports whether the client may send one more packet of any
// operation under the per-connection rate limit.
func (c *channel) allowPacket(now time.Time, perSec float64, burst int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ops.allow(now.UnixNano(), perSec, burst)
}

// heartbeatDue reports whether a heartbeat at now is forwarded to logic,
// and if so records it: one every heartbeatEvery keeps the session alive.
func (c *channel) heartbeatDue(now time.Time) bool {
	every := time.Duration(0)
	if c.grants != nil {
		every = c.grants.heartbeatEvery
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	t := now.UnixNano()
	if c.heartbeatAt != 0 && time.Duration(t-c.heartbeatAt) < every {
		return false
	}
	c.heartbeatAt = t
	return true
}

// setWake sets what close calls to resume the connection's parked reader,
// which must see the connection end.
func (c *channel) setWake(fn func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.wake = fn
}

func (c *channel) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

func newChannel(t transport, sendQueue, sendQueueBytes int, slow *atomic.Int64, logger *slog.Logger) *channel {
	return &channel{t: t, limit: sendQueue, limitBytes: sendQueueBytes, slow: slow, logger: logger}
}

// accepts reports whether the client listens to op.
func (c *channel) accepts(op int32) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.acceptsLocked(op)
}

func (c *channel) acceptsLocked(op int32) bool {
	if c.acceptOps == nil {
		return true
	}
	_, ok := c.acceptOps[op]
	return ok
}

// setAccepts adds or removes operations. Subscribing on a connection that
// accepted everything narrows it to the listed operations; unsubscribing
// from "everything" leaves it accepting everything. Adding an operation
// the token does not grant is errOpNotAllowed; subscribing more than the
// connection's bound (one client once grew this set to 1.5 GB) is
// errTooManyOps. Either leaves the set as it was.
func (c *channel) setAccepts(ops []int32, add bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.acceptOps == nil {
		if !add {
			return nil
		}
		c.acceptOps = map[int32]struct{}{}
	}
	if !add {
		for _, op := range ops {
			delete(c.acceptOps, op)
		}
		return nil
	}
	if g := c.grants; g != nil {
		fresh := 0
		for _, op := range ops {
			if !g.anyAccept && len(g.accepts) > 0 && !slices.Contains(g.accepts, op) {
				return fmt.Errorf("%w: %d", errOpNotAllowed, op)
			}
			if _, ok := c.acceptOps[op]; !ok {
				fresh++ // an op listed twice counts twice: the bound only errs safe
			}
		}
		if len(c.acceptOps)+fresh > max(g.maxAccepts, len(g.accepts)) {
			return fmt.Errorf("%w: at most %d", errTooManyOps, max(g.maxAccepts, len(g.accepts)))
		}
	}
	for _, op := range ops {
		c.acceptOps[op] = struct{}{}
	}
	return nil
}

func (c *channel) roomList() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.rooms)
}

// firstRoom is the room whose online count heartbeats report.
func (c *channel) firstRoom() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.rooms) == 0 {
		return ""
	}
	return c.rooms[0]
}

// push queues the pushed packets the client accepts, together, so that
// they go out in one write; it reports whether any was queued.
func (c *channel) push(items ...outItem) bool {
	return c.enqueue(items, true)
}

// reply queues a reply to the client's own request.
func (c *channel) reply(item outItem) bool {
	return c.enqueue([]outItem{item}, false)
}

// enqueue never blocks: a client whose queue is full is not keeping up and
// is closed, so that it costs nobody else anything.
func (c *channel) enqueue(items []outItem, filter bool) bool {
	c.mu.Lock()
	if c.closed || c.draining {
		c.mu.Unlock()
		return false
	}
	n := len(c.queue)
	added := 0
	heldAny := false
	for _, it := range items {
		if filter && !c.acceptsLocked(it.op) {
			continue
		}
		if it.sp != nil && c.optedIn {
			if c.rec != nil {
				c.rec.hold(it)
				heldAny = true
				continue
			}
			if c.belowFloor(it.sp) {
				continue
			}
			it.pkt = it.sp.packet(&it)
		}
		c.queue = append(c.queue, it)
		added += len(it.pkt)
	}
	if len(c.queue) == n {
		c.mu.Unlock()
		return heldAny
	}
	if len(c.queue) > c.limit || c.queued+added > c.limitBytes {
		clear(c.queue[n:])
		c.queue = c.queue[:n]
		packets, bytes := len(c.queue), c.queued
		c.mu.Unlock()
		c.logger.Info("closing slow consumer", "mid", c.mid, "key", c.key, "queued", packets, "queued_bytes", bytes)
		c.slow.Add(1)
		c.close(closeSlowConsumer, "slow consumer")
		return false
	}
	c.queued += added
	start := !c.writing && !c.held
	c.writing = c.writing || start
	c.mu.Unlock()
	if start {
		go c.flush()
	}
	return true
}

// release writes what was queued while the channel was held, and what
// comes after.
func (c *channel) release() {
	c.mu.Lock()
	start := c.held && !c.closed && !c.writing && len(c.queue) > 0
	c.held = false
	c.writing = c.writing || start
	c.mu.Unlock()
	if start {
		go c.flush()
	}
}

// flush writes until the queue is empty, then ends.
func (c *channel) flush() {
	var spare []outItem
	for {
		c.mu.Lock()
		if c.closed || len(c.queue) == 0 {
			c.writing = false
			c.queue = nil
			c.queued = 0
			if !c.closed && cap(spare) <= keptQueue {
				// An idle connection keeps a small queue, never a burst-sized one.
				c.queue = spare
			}
			drained := c.draining && !c.closed
			c.mu.Unlock()
			if drained {
				c.close(closeGoingAway, "server shutting down")
			}
			return
		}
		batch := c.queue
		c.queue = spare
		c.queued = 0
		if c.space != nil {
			select {
			case c.space <- struct{}{}:
			default:
			}
		}
		c.mu.Unlock()

		var err error
		for rest := batch; len(rest) > 0 && err == nil; {
			n := min(len(rest), maxWriteBatch)
			err = c.t.Write(rest[:n], &c.seq)
			if err == nil {
				c.metrics.Wrote(n)
				notifyWritten(rest[:n])
			}
			rest = rest[n:]
		}
		clear(batch) // drop the references to shared packets
		spare = batch[:0]
		if err != nil {
			c.logger.Debug("write failed", "key", c.key, "err", err)
			c.close(closeNormal, "")
		}
	}
}

// closeAfterFlush closes with 1001 once what is queued has been written;
// nothing new is queued meanwhile.
func (c *channel) closeAfterFlush() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.draining = true
	busy := c.writing
	c.mu.Unlock()
	if !busy {
		c.close(closeGoingAway, "server shutting down")
	}
}

// close ends the connection once, telling the client why. What is still
// queued is dropped. The transport closes in the background: the close
// frame waits behind a write in progress, and the caller may be a push
// holding a bucket lock.
func (c *channel) close(code int, reason string) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.closeCode, c.closeReason = code, reason
	c.queue = nil
	c.queued = 0
	wake := c.wake
	c.mu.Unlock()
	go c.t.Close(code, reason)
	if wake != nil {
		wake()
	}
}

// allowUpstream reports whether the client may send one more upstream
// message under the per-connection rate limit.
func (c *channel) allowUpstream(now time.Time, perSec float64, burst int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.upstream.allow(now.UnixNano(), perSec, burst)
}

// parseOps reads a comma-separated operation list ("1000,1001").
func parseOps(body []byte) ([]int32, bool) {
	var ops []int32
	for f := range strings.SplitSeq(string(body), ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		n, err := strconv.ParseInt(f, 10, 32)
		if err != nil {
			return nil, false
		}
		ops = append(ops, int32(n))
	}
	return ops, true
}

// authReply is the op 8 body. Recover, Acks and Streams are only for a
// connection that opted in: goim's op 8 is unchanged.
type authReply struct {
	Mid       int64    `json:"mid"`
	Key       string   `json:"key"`
	Rooms     []string `json:"rooms"`
	Heartbeat int64    `json:"heartbeat"`

	Recover bool             `json:"-"`
	Acks    bool             `json:"-"`
	Streams []wire.StreamPos `json:"-"`
}

func (r authReply) encode() []byte {
	if r.Rooms == nil {
		r.Rooms = []string{}
	}
	if !r.Recover {
		b, _ := json.Marshal(r)
		return b
	}
	if r.Streams == nil {
		r.Streams = []wire.StreamPos{}
	}
	b, _ := json.Marshal(struct {
		authReply
		Recover bool             `json:"recover"`
		Acks    bool             `json:"acks"`
		Streams []wire.StreamPos `json:"streams"`
	}{r, true, r.Acks, r.Streams})
	return b
}

// startPositions are where the connection's streams start, for op 8:
// logic's tops, and for the user stream with acks on its acknowledged
// position (recovery sends what follows). A stream without an epoch
// (history off, or unreadable) is left out.
func (c *channel) startPositions(tops []*pb.StreamPos) []wire.StreamPos {
	out := make([]wire.StreamPos, 0, len(c.rooms)+1)
	user := pipeline.UserStream(c.mid)
	if c.acks && c.acked != nil && c.acked.Epoch != "" {
		out = append(out, wire.StreamPos{Stream: user, Epoch: c.acked.Epoch, Pos: c.acked.Pos})
	} else if t := findTop(tops, user); t != nil && t.Epoch != "" {
		out = append(out, wire.StreamPos{Stream: user, Epoch: t.Epoch, Pos: t.Pos})
	}
	for _, r := range c.rooms {
		if t := findTop(tops, pipeline.RoomStream(r)); t != nil && t.Epoch != "" {
			out = append(out, wire.StreamPos{Stream: t.Stream, Epoch: t.Epoch, Pos: t.Pos})
		}
	}
	return out
}

// closedWith is the code the connection was closed with (0: open).
func (c *channel) closedWith() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closeCode
}

// transportName is t's kind, the label of imcloud_cloud_connections.
func transportName(t transport) string {
	switch t := t.(type) {
	case *tcpTransport:
		return "tcp"
	case *wsTransport:
		if _, ok := t.conn.NetConn().(*tls.Conn); ok {
			return "wss"
		}
		return "ws"
	}
	return "other"
}

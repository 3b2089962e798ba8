package cloud

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gorilla/websocket"

	"imcloud/proto/wire"
)

// transport is the framing of one connection: TCP or WebSocket.
type transport interface {
	// Read returns the next packets the client sent.
	Read() ([]wire.Packet, error)
	// Write sends a batch in one write, numbering push packets from seq.
	Write(batch []outItem, seq *atomic.Int32) error
	// Close tells the client why, where the framing can, and closes. It
	// may wait up to writeDeadline for a write in progress.
	Close(code int, reason string)
	SetReadDeadline(t time.Time) error
	RemoteAddr() net.Addr
	// admitted is called once the client authenticated: its reads get
	// the client budget (see readBudget) and its control frames cost
	// allow's tokens.
	admitted(b clientBudget, allow func() bool)
	// idleConn returns the socket when nothing the client sent is
	// buffered, so that the connection may wait without a reader; false
	// when data is buffered or the socket cannot be watched (TLS keeps
	// its own buffer).
	idleConn() (syscall.Conn, bool)
}

// idleSocket is conn as a watchable socket when br holds nothing.
func idleSocket(conn net.Conn, br *bufio.Reader) (syscall.Conn, bool) {
	if br.Buffered() > 0 {
		return nil, false
	}
	return socketOf(conn)
}

// socketOf is the socket under the node's own wrappers of conn (the read
// budget, the connection count), or false when there is none to watch: a
// TLS connection keeps its own buffer.
func socketOf(conn net.Conn) (syscall.Conn, bool) {
	for {
		switch c := conn.(type) {
		case *readBudget:
			conn = c.Conn
		case *countedConn:
			conn = c.Conn
		default:
			sc, ok := conn.(syscall.Conn)
			return sc, ok
		}
	}
}

// writeDeadline bounds one write so that a peer that stopped reading
// cannot hold its writer forever.
const writeDeadline = 10 * time.Second

// deadline keeps a connection's write deadline between writeDeadline/2
// and writeDeadline ahead, setting it only when it runs low: setting it on
// every write cost 3% of the CPU of a large fan-out.
type deadline struct{ until time.Time }

// only the connection's single writer calls refresh.
func (d *deadline) refresh(set func(time.Time) error) {
	now := time.Now()
	if d.until.Sub(now) < writeDeadline/2 {
		d.until = now.Add(writeDeadline)
		_ = set(d.until)
	}
}

// appendBatch encodes the batch into dst, writing each push packet's
// delivery sequence into the copy.
func appendBatch(dst []byte, batch []outItem, seq *atomic.Int32) []byte {
	for _, it := range batch {
		start := len(dst)
		dst = append(dst, it.pkt...)
		if it.push {
			wire.SetSeq(dst[start:], seq.Add(1))
		}
	}
	return dst
}

// newBufPool returns a pool of write buffers, shared by a node's
// connections: an idle connection holds none.
func newBufPool() *sync.Pool {
	return &sync.Pool{New: func() any { b := make([]byte, 0, 4096); return &b }}
}

// tcpTransport carries packets back to back on a stream.
type tcpTransport struct {
	conn   net.Conn
	br     *bufio.Reader
	budget *readBudget
	r      *wire.Reader
	bufs   *sync.Pool
	dl     deadline
}

// readBuffer is a connection's read buffer. Clients mostly send
// heartbeats (a header and a few bytes); a larger packet takes more than
// one read. Every idle connection holds one, so it is small; gorilla
// takes a hijacked reader as its own only when it is over 256 bytes.
const readBuffer = 512

func newTCPTransport(conn net.Conn, maxBody int, bufs *sync.Pool) *tcpTransport {
	budget := newReadBudget(conn, maxBody)
	br := bufio.NewReaderSize(budget, readBuffer)
	return &tcpTransport{conn: conn, br: br, budget: budget, r: wire.NewReader(br, maxBody), bufs: bufs}
}

func (t *tcpTransport) admitted(b clientBudget, _ func() bool) {
	t.budget.admit(b)
	markAuthenticated(t.conn)
}

func (t *tcpTransport) idleConn() (syscall.Conn, bool) { return idleSocket(t.conn, t.br) }

func (t *tcpTransport) Read() ([]wire.Packet, error) {
	p, err := t.r.Read()
	if err != nil {
		return nil, err
	}
	return []wire.Packet{p}, nil
}

func (t *tcpTransport) Write(batch []outItem, seq *atomic.Int32) error {
	bp := t.bufs.Get().(*[]byte)
	buf := appendBatch((*bp)[:0], batch, seq)
	t.dl.refresh(t.conn.SetWriteDeadline)
	_, err := t.conn.Write(buf)
	*bp = buf[:0]
	t.bufs.Put(bp)
	return err
}

func (t *tcpTransport) Close(int, string)                 { _ = t.conn.Close() }
func (t *tcpTransport) SetReadDeadline(d time.Time) error { return t.conn.SetReadDeadline(d) }
func (t *tcpTransport) RemoteAddr() net.Addr              { return t.conn.RemoteAddr() }

// wsTransport carries one packet per binary frame, or several in an op 9
// frame.
type wsTransport struct {
	conn    *websocket.Conn
	br      *bufio.Reader // gorilla's reader, ours through hijack
	budget  *readBudget   // under br; nil when the hijack kept net/http's reader
	maxBody int
	bufs    *sync.Pool
	dl      deadline
	// allow charges a ping or pong frame to the client's packet bucket;
	// nil before authentication, when controlLeft bounds them instead.
	// Only the reader calls it.
	allow       func() bool
	controlLeft int
}

// handshakeControlFrames is how many pings and pongs a client may send
// before it authenticates.
const handshakeControlFrames = 16

// newWSTransport makes conn's pings and pongs cost the client (gorilla
// answers them inside ReadMessage, where the packet limit never saw them:
// a ping flood held 70% of a core with no 4029).
func newWSTransport(conn *websocket.Conn, br *bufio.Reader, budget *readBudget, maxBody int, bufs *sync.Pool) *wsTransport {
	t := &wsTransport{conn: conn, br: br, budget: budget, maxBody: maxBody, bufs: bufs, controlLeft: handshakeControlFrames}
	conn.SetPingHandler(func(data string) error {
		if err := t.chargeControl("ping"); err != nil {
			return err
		}
		// As gorilla's own handler: a pong that cannot be written is
		// not the reader's error; the writer or the deadline ends the
		// connection.
		err := conn.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(time.Second))
		var ne net.Error
		if err == nil || errors.Is(err, websocket.ErrCloseSent) || errors.As(err, &ne) {
			return nil
		}
		return err
	})
	conn.SetPongHandler(func(string) error { return t.chargeControl("pong") })
	return t
}

func (t *wsTransport) chargeControl(what string) error {
	if t.allow != nil {
		if !t.allow() {
			return fmt.Errorf("%w: %s frames over cloud.client_rate", errRateLimited, what)
		}
		return nil
	}
	if t.controlLeft <= 0 {
		return fmt.Errorf("%w: more than %d %s frames before auth", errRateLimited, handshakeControlFrames, what)
	}
	t.controlLeft--
	return nil
}

func (t *wsTransport) admitted(b clientBudget, allow func() bool) {
	if t.budget != nil {
		t.budget.admit(b)
	}
	t.allow = allow
	markAuthenticated(t.conn.NetConn())
}

func (t *wsTransport) Read() ([]wire.Packet, error) {
	_, frame, err := t.conn.ReadMessage()
	if err != nil {
		return nil, err
	}
	return wire.DecodeAll(frame, t.maxBody)
}

func (t *wsTransport) Write(batch []outItem, seq *atomic.Int32) error {
	bp := t.bufs.Get().(*[]byte)
	buf := (*bp)[:0]
	if len(batch) == 1 {
		buf = appendBatch(buf, batch, seq)
	} else {
		// One op 9 packet whose body is the whole batch.
		buf = append(buf, make([]byte, wire.HeaderLen)...)
		buf = appendBatch(buf, batch, seq)
		wire.PutHeader(buf, len(buf)-wire.HeaderLen, wire.OpRaw, 0)
	}
	t.dl.refresh(t.conn.SetWriteDeadline)
	err := t.conn.WriteMessage(websocket.BinaryMessage, buf)
	*bp = buf[:0]
	t.bufs.Put(bp)
	return err
}

func (t *wsTransport) Close(code int, reason string) {
	msg := websocket.FormatCloseMessage(code, reason)
	// The close frame goes after any frame being written, so that a client
	// that was only slow still learns why it was closed.
	_ = t.conn.WriteControl(websocket.CloseMessage, msg, time.Now().Add(writeDeadline))
	_ = t.conn.Close()
}

func (t *wsTransport) SetReadDeadline(d time.Time) error { return t.conn.SetReadDeadline(d) }
func (t *wsTransport) idleConn() (syscall.Conn, bool) {
	if t.br == nil {
		return nil, false
	}
	return idleSocket(t.conn.NetConn(), t.br)
}
func (t *wsTransport) RemoteAddr() net.Addr { return t.conn.RemoteAddr() }

// isTooLarge reports whether err is a client packet over the body limit.
func isTooLarge(err error) bool {
	return errors.Is(err, wire.ErrTooLarge) || errors.Is(err, websocket.ErrReadLimit)
}

// upgrader builds the WebSocket upgrader for the allowed origins: empty
// means same origin only (gorilla's default check), "*" any origin.
func upgrader(allowed []string) *websocket.Upgrader {
	u := &websocket.Upgrader{
		// 0: gorilla reads through the reader hijack returns (see
		// ownReader), which the node can then look into.
		ReadBufferSize:  0,
		WriteBufferSize: 1024,
		WriteBufferPool: &sync.Pool{},
	}
	if len(allowed) == 0 {
		return u
	}
	set := map[string]bool{}
	for _, o := range allowed {
		set[o] = true
	}
	u.CheckOrigin = func(r *http.Request) bool {
		origin := r.Header.Get("Origin")
		return set["*"] || origin == "" || set[origin]
	}
	return u
}

// originAllowed is the check u makes of r's Origin: its CheckOrigin, or
// gorilla's default (no Origin, or the Origin's host is the request's).
func originAllowed(u *websocket.Upgrader, r *http.Request) bool {
	if u.CheckOrigin != nil {
		return u.CheckOrigin(r)
	}
	origin := r.Header.Get("Origin")
	if origin == "" {
		return true
	}
	o, err := url.Parse(origin)
	return err == nil && strings.EqualFold(o.Host, r.Host)
}

// ownReader makes gorilla read a WebSocket through a bufio.Reader the
// node holds, so that it can tell whether a frame is already buffered
// before letting the connection wait without a reader. gorilla reuses the
// reader a hijack returns when its own ReadBufferSize is 0, reset onto the
// conn the hijack returns: the read budget, so that gorilla's reads are
// charged.
type ownReader struct {
	http.ResponseWriter
	maxBody int
	br      *bufio.Reader
	budget  *readBudget
}

func (w *ownReader) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil || brw.Reader.Buffered() > 0 {
		// gorilla refuses a client that sent data before the handshake
		// completed; hand it what it needs to see that.
		return conn, brw, err
	}
	// What gorilla reads is charged to the client's byte budget: it
	// handles continuation and control frames inside ReadMessage, where
	// the packet limit never sees them.
	w.budget = newReadBudget(conn, w.maxBody)
	w.br = bufio.NewReaderSize(w.budget, readBuffer)
	return w.budget, bufio.NewReadWriter(w.br, brw.Writer), nil
}

// frameOverhead is the most a client packet adds to its body on the wire:
// the 16-byte header and, over WebSocket, a 14-byte frame header.
const frameOverhead = wire.HeaderLen + 14

// budgetSlack multiplies the bytes a packet may cost. A WebSocket client
// may split one message into several frames, each adding up to 8 bytes of
// header: with the budget at exactly one frame per packet, a client
// sending the largest packets at its packet rate in 3 or 4 frames each was
// closed during its first burst. Twice the largest packet lets a message
// of the largest size come in hundreds of frames (6 bytes each when small)
// and still bounds an empty-frame flood to twice what the packet limit
// allows.
const budgetSlack = 2

// handshakeBudgetPackets is how many largest packets' bytes a connection
// may send before it authenticates, with no refill: its auth packet and
// some it pipelined behind it.
const handshakeBudgetPackets = 4

// clientBudget is an authenticated client's read byte budget: its packet
// rate and burst (cloud.client_rate, cloud.client_burst) in largest
// packets, so that a client within its packet limit is never over it.
type clientBudget struct {
	perSec float64
	burst  float64
}

func newClientBudget(rate float64, burst, maxBody int) clientBudget {
	size := float64(budgetSlack * (maxBody + frameOverhead))
	return clientBudget{perSec: rate * size, burst: float64(burst) * size}
}

// readBudget charges every byte read from a client's socket to a token
// bucket; a read over it fails with errRateLimited, which closes the
// connection with 4029. The transport's bufio.Reader (gorilla's too)
// reads through it, so that it sees frames no packet is made of: empty
// WebSocket continuation frames, 6 bytes each, held a core at 99.8% for
// the 8 minutes of a connection's read deadline, each frame costing
// nothing the packet limit saw. Before authentication the budget is a
// fixed handshakeBudgetPackets packets' bytes. Only the connection's
// reader reads, and calls admit.
//
// Measured (node CPU over a 10 s flood of empty continuation frames from
// an authenticated WebSocket, /proc/<pid>/stat, default config): 97% of
// a core before, 0% after: the connection is closed with 4029 once its
// 412 KB burst is read, well within a second. An attacker that reconnects
// and floods again is held to what reconnecting costs: 96% of a core for
// 2,818 connections in 10 s, against 66% for 36,370 reconnects that send
// nothing (before auth: 66% for 18,743, against 62% for 68,506).
//
// It is the net.Conn a WebSocket's hijack returns, because gorilla resets
// the hijacked bufio.Reader onto that conn; the parker watches the socket
// under it (see socketOf).
type readBudget struct {
	net.Conn
	b      clientBudget
	tokens float64
	last   int64 // unix nanoseconds of the last refill
	err    error // once over, every read fails
}

func newReadBudget(c net.Conn, maxBody int) *readBudget {
	return &readBudget{Conn: c, tokens: float64(handshakeBudgetPackets * (maxBody + frameOverhead))}
}

// admit switches to the client's budget, full.
func (b *readBudget) admit(cb clientBudget) {
	b.b = cb
	b.tokens = cb.burst
	b.last = time.Now().UnixNano()
}

func (b *readBudget) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	n, err := b.Conn.Read(p)
	if n == 0 {
		return n, err
	}
	if b.b.perSec > 0 {
		now := time.Now().UnixNano()
		b.tokens = min(b.b.burst, b.tokens+float64(now-b.last)*b.b.perSec/1e9)
		b.last = now
	}
	b.tokens -= float64(n)
	if b.tokens < 0 {
		if b.b.perSec > 0 {
			b.err = fmt.Errorf("%w: more than %.0f bytes/s read", errRateLimited, b.b.perSec)
		} else {
			b.err = fmt.Errorf("%w: more than %d packets' bytes before auth", errRateLimited, handshakeBudgetPackets)
		}
		return 0, b.err
	}
	return n, err
}

// NetConn is the connection under the budget (see markAuthenticated).
func (b *readBudget) NetConn() net.Conn { return b.Conn }

package cloud

import (
	"bufio"
	"errors"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
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
	conn net.Conn
	r    *wire.Reader
	bufs *sync.Pool
	dl   deadline
}

// readBuffer is a connection's read buffer. Clients mostly send
// heartbeats (a header and a few bytes); a larger packet takes more than
// one read. Every idle connection holds one, so it is small.
const readBuffer = 256

func newTCPTransport(conn net.Conn, maxBody int, bufs *sync.Pool) *tcpTransport {
	return &tcpTransport{conn: conn, r: wire.NewReader(bufio.NewReaderSize(conn, readBuffer), maxBody), bufs: bufs}
}

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
	maxBody int
	bufs    *sync.Pool
	dl      deadline
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
func (t *wsTransport) RemoteAddr() net.Addr              { return t.conn.RemoteAddr() }

// isTooLarge reports whether err is a client packet over the body limit.
func isTooLarge(err error) bool {
	return errors.Is(err, wire.ErrTooLarge) || errors.Is(err, websocket.ErrReadLimit)
}

// upgrader builds the WebSocket upgrader for the allowed origins: empty
// means same origin only (gorilla's default check), "*" any origin.
func upgrader(allowed []string) *websocket.Upgrader {
	u := &websocket.Upgrader{
		ReadBufferSize:  readBuffer,
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

package logic

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"mime"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"

	"imcloud/pipeline/idempotency"
	"imcloud/proto/wire"
)

// api is which of the two HTTP APIs a request came in by.
type api int

const (
	// apiIM is /im/: query parameters and the raw body as the message, or
	// a JSON parameter object when the caller says so with PushJSONType.
	apiIM api = iota
	// apiGoim is /goim/: goim's API as goim's tools call it. The body is
	// always the message, whatever its Content-Type (goim's tools send
	// application/json and application/x-www-form-urlencoded bodies).
	apiGoim
)

// PushJSONType is the media type a caller of /im/push/* sets to send its
// parameters as a JSON object holding the message in "msg". A plain
// application/json body is a message like any other: guessing would
// re-route a JSON message that happens to hold "room" or "mids".
const PushJSONType = "application/vnd.imcloud.push+json"

// Limits on the headers the API accepts. The strings a caller names as
// targets (rooms, keys, platforms) are checked by proto/wire's validators,
// the ones a client is held to, so that the API accepts exactly the rooms
// a client may join and the keys a client may hold.
const (
	// MaxIdempotencyKeyBytes caps Idempotency-Key: a UUID is 36 bytes; the
	// cap leaves room for a caller's own scheme (order ids with a prefix).
	MaxIdempotencyKeyBytes = 255
	maxRequestIDBytes      = 255
	// echoBytes bounds how much of a bad value an error message quotes.
	echoBytes = 32
)

// reply is the envelope of every HTTP answer.
type reply struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
	Data    any    `json:"data,omitempty"`
}

func writeJSON(w http.ResponseWriter, status int, r reply) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(r)
}

// writeData answers 200 with the envelope around data, JSON that
// json.Marshal made. Embedded as a json.RawMessage, encoding/json
// validated and compacted it again: 4 % of a push's CPU in a profile of
// push/mids with positions in the reply (go tool pprof, 7 s at 44k
// req/s).
func writeData(w http.ResponseWriter, message string, data []byte) {
	var msg []byte
	switch message { // the two a push answers: no encoder for them
	case "":
		msg = []byte(`""`)
	case "ok":
		msg = []byte(`"ok"`)
	default:
		msg, _ = json.Marshal(message)
	}
	if len(data) == 0 {
		data = []byte("null")
	}
	buf := make([]byte, 0, len(data)+len(msg)+32)
	buf = append(buf, `{"code":0,"message":`...)
	buf = append(buf, msg...)
	buf = append(buf, `,"data":`...)
	buf = append(buf, data...)
	buf = append(buf, "}\n"...)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(buf)
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, reply{Code: -status, Message: msg})
}

// okMessage is the success message: goim answers "", imcloud "ok".
func (a api) okMessage() string {
	if a == apiGoim {
		return ""
	}
	return "ok"
}

// paramError is a bad request naming its field.
type paramError struct {
	field, problem string
}

func (e *paramError) Error() string { return e.field + ": " + e.problem }

func badParam(field, format string, args ...any) error {
	return &paramError{field: field, problem: fmt.Sprintf(format, args...)}
}

// echo quotes the start of a bad value for an error message.
func echo(s string) string {
	if len(s) > echoBytes {
		return strconv.Quote(s[:echoBytes]) + "…"
	}
	return strconv.Quote(s)
}

// checkText validates a string a caller gave: valid UTF-8, at most max
// bytes, no control characters.
func checkText(field, s string, max int) error {
	if err := wire.ValidText(s, max); err != nil {
		return wireError(field, err)
	}
	return nil
}

// wireError renders a proto/wire validation error as the API's, naming
// the API's field: wire's errors start with their own subject ("room: ").
func wireError(field string, err error) error {
	_, problem, _ := strings.Cut(err.Error(), ": ")
	return badParam(field, "%s", problem)
}

// checkType validates a room type: the type of a room a client may join
// (wire.ValidRoom), with room for at least a one-byte id.
func checkType(typ string) error {
	if strings.Contains(typ, "://") {
		return badParam("type", "must not hold \"://\"")
	}
	if max := wire.MaxRoomLen - len("://x"); len(typ) > max {
		return badParam("type", "%d bytes, at most %d (type://room is at most %d)", len(typ), max, wire.MaxRoomLen)
	}
	if err := wire.ValidRoom(RoomKey(typ, "x")); err != nil {
		return wireError("type", err)
	}
	return nil
}

// checkRoom validates a room type and id: type://id must be a room a
// client may join (wire.ValidRoom). Errors name field for the id.
func checkRoom(field, typ, room string) error {
	if err := checkType(typ); err != nil {
		return err
	}
	key := RoomKey(typ, room)
	if len(key) > wire.MaxRoomLen {
		return badParam(field, "type://room is %d bytes, at most %d", len(key), wire.MaxRoomLen)
	}
	if err := wire.ValidRoom(key); err != nil {
		return wireError(field, err)
	}
	return nil
}

// params are a request's parameters: from the query string, and for
// /im/ with PushJSONType also from a JSON object. A field may come from
// one place only, and a single-valued field once; list fields (keys, mids,
// rooms) repeat in the query string or are a JSON list.
type params struct {
	values url.Values
	json   map[string]json.RawMessage
	msg    []byte
}

// listFields may repeat: each occurrence is one element.
var listFields = map[string]bool{"keys": true, "mids": true, "rooms": true}

// check rejects a field given in both places, or a single-valued field
// given twice.
func (p *params) check() error {
	for f, vs := range p.values {
		if _, inJSON := p.json[f]; inJSON {
			return badParam(f, "given in both the query string and the JSON body")
		}
		if len(vs) > 1 && !listFields[f] {
			return badParam(f, "given %d times, want once", len(vs))
		}
	}
	return nil
}

// has reports whether field was given in either form.
func (p *params) has(field string) bool {
	_, inJSON := p.json[field]
	return inJSON || p.values.Has(field)
}

// strings returns a field's values; JSON may give a list or one value.
func (p *params) strings(field string) ([]string, error) {
	raw, ok := p.json[field]
	if !ok {
		return p.values[field], nil
	}
	var list []json.RawMessage
	if !listFields[field] || json.Unmarshal(raw, &list) != nil {
		list = []json.RawMessage{raw}
	}
	out := make([]string, 0, len(list))
	for _, item := range list {
		s, err := scalar(item)
		if err != nil {
			if listFields[field] {
				return nil, badParam(field, "want a string or number, or a list of them")
			}
			return nil, badParam(field, "want a string or number")
		}
		out = append(out, s)
	}
	return out, nil
}

// scalar renders a JSON string or number as text.
func scalar(raw json.RawMessage) (string, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, nil
	}
	var n json.Number
	if err := json.Unmarshal(raw, &n); err != nil {
		return "", err
	}
	return n.String(), nil
}

func (p *params) string(field string) (string, error) {
	vs, err := p.strings(field)
	if err != nil || len(vs) == 0 {
		return "", err
	}
	return vs[0], nil // check() refused a repeated single field
}

func (p *params) requiredString(field string) (string, error) {
	s, err := p.string(field)
	if err != nil {
		return "", err
	}
	if strings.TrimSpace(s) == "" {
		return "", badParam(field, "required")
	}
	return s, nil
}

func (p *params) int(field string, bits int, min, max int64) (int64, error) {
	s, err := p.requiredString(field)
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseInt(strings.TrimSpace(s), 10, bits)
	if err != nil || n < min || n > max {
		return 0, badParam(field, "want an integer from %d to %d, got %s", min, max, echo(s))
	}
	return n, nil
}

func (p *params) operation() (int32, error) {
	op, err := p.int("operation", 32, 1000, math.MaxInt32)
	return int32(op), err
}

// getParams reads a GET route's query string.
func getParams(r *http.Request) (*params, error) {
	values, err := queryParams(r)
	if err != nil {
		return nil, err
	}
	p := &params{values: values}
	return p, p.check()
}

// readBody reads r's body, at most limit bytes (past it, an
// *http.MaxBytesError). A body that declares a length up to
// maxPresizedBody is read into a buffer of that length: io.ReadAll starts
// at 512 bytes and doubles, which cost every 5-byte push 512 bytes and a
// batch several times its size. A larger declared length is not given
// memory before its bytes arrive.
func readBody(r *http.Request, limit int64) ([]byte, error) {
	body := http.MaxBytesReader(nil, r.Body, limit)
	if n := r.ContentLength; n >= 0 && n <= min(limit, maxPresizedBody) {
		buf := make([]byte, n)
		if _, err := io.ReadFull(body, buf); err != nil {
			return nil, err
		}
		return buf, nil
	}
	return io.ReadAll(body)
}

// maxPresizedBody is the largest declared body length readBody allocates
// for before reading: 4 KiB holds any raw push (logic.max_message_bytes
// defaults to 4,080) and a batch of about 60 room pushes, while a client
// that declares it and sends nothing holds no more than that.
const maxPresizedBody = 4 << 10

// readParams reads a push request. The message is the raw body, or, for
// /im/ with PushJSONType, the JSON object's msg: a JSON string as its
// text, anything else as its encoding.
func readParams(r *http.Request, a api, maxMsg int) (*params, error) {
	values, err := queryParams(r)
	if err != nil {
		return nil, err
	}
	p := &params{values: values}
	limit := int64(maxMsg)
	isJSON := false
	if a == apiIM {
		if isJSON, err = pushJSONBody(r); err != nil {
			return nil, err
		}
	}
	if isJSON {
		// The JSON form wraps the message, so allow room for the fields
		// around it: a message escaped as a JSON string grows at most
		// 6-fold (\u00XX), and 64 KiB holds thousands of targets.
		limit = jsonBodyLimit(maxMsg)
	}
	body, err := readBody(r, limit)
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		if isJSON {
			return nil, &tooLargeError{fmt.Sprintf("body: JSON parameter body larger than %d bytes", limit)}
		}
		return nil, &tooLargeError{fmt.Sprintf("msg: larger than %d bytes", maxMsg)}
	}
	if err != nil {
		return nil, badParam("body", "read: %v", err)
	}
	if !isJSON {
		p.msg = body
	} else {
		obj, err := decodeObject(body)
		if err != nil {
			return nil, err
		}
		if err := p.setJSON(obj, pushFields); err != nil {
			return nil, err
		}
	}
	if len(p.msg) > maxMsg {
		return nil, &tooLargeError{fmt.Sprintf("msg: larger than %d bytes", maxMsg)}
	}
	return p, p.check()
}

// pushFields are the members of a PushJSONType object.
var pushFields = map[string]bool{"operation": true, "keys": true, "mids": true, "type": true, "room": true, "speed": true, "msg": true}

// setJSON takes a push's parameters from a JSON object whose members are
// among allowed: the message is its msg, a JSON string as its text and
// anything else as its encoding.
func (p *params) setJSON(obj map[string]json.RawMessage, allowed map[string]bool) error {
	for f := range obj {
		if !allowed[f] {
			return badParam(truncate(f), "unknown field")
		}
	}
	raw, ok := obj["msg"]
	if !ok {
		return badParam("msg", "required in a JSON body")
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		p.msg = []byte(s)
	} else {
		p.msg = bytes.TrimSpace(raw)
	}
	p.json = obj
	return nil
}

// jsonBodyLimit bounds a JSON parameter body for a message of at most
// maxMsg bytes.
func jsonBodyLimit(maxMsg int) int64 { return int64(maxMsg)*6 + 64<<10 }

// queryParams parses the query string. url.URL.Query drops what it cannot
// parse without a word (pairs holding ';', everything past Go's 10,000
// parameters), which turned a request into one with fewer targets or none:
// a query that does not parse is refused instead.
func queryParams(r *http.Request) (url.Values, error) {
	v, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return nil, badParam("query", "%s", truncate(err.Error()))
	}
	return v, nil
}

// pushJSONBody reports whether an /im/ request sends its parameters as a
// PushJSONType object. A Content-Type that does not parse is refused:
// mime.ParseMediaType returns the media type along with an error for a
// bad parameter ("...+json; charset"), and reading that as a raw message
// would publish the caller's parameter object to the wrong target.
func pushJSONBody(r *http.Request) (bool, error) {
	vs := r.Header.Values("Content-Type")
	if len(vs) > 1 {
		return false, badParam("Content-Type", "given %d times, want once", len(vs))
	}
	if len(vs) == 0 || strings.TrimSpace(vs[0]) == "" {
		return false, nil
	}
	mt, _, err := mime.ParseMediaType(vs[0])
	if err != nil {
		return false, badParam("Content-Type", "%s does not parse: %v", echo(vs[0]), err)
	}
	return mt == PushJSONType, nil
}

// decodeObject reads one JSON object into its members, refusing a member
// given twice: encoding/json lets the last one win, so
// {"mids":[5],"mids":[1]} pushed to mid 1 only.
func decodeObject(body []byte) (map[string]json.RawMessage, error) {
	notObject := badParam("body", "want a JSON object")
	dec := json.NewDecoder(bytes.NewReader(body))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, notObject
	}
	out := map[string]json.RawMessage{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, notObject
		}
		name, _ := tok.(string) // inside an object, Token gives member names as strings
		if _, dup := out[name]; dup {
			return nil, badParam(truncate(name), "given twice in the JSON body, want once")
		}
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, notObject
		}
		out[name] = raw
	}
	if tok, err := dec.Token(); err != nil || tok != json.Delim('}') {
		return nil, notObject
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, badParam("body", "want one JSON object, found more after it")
	}
	return out, nil
}

// truncate shortens a caller's field name for an error message.
func truncate(s string) string {
	s = strings.ToValidUTF8(s, "?")
	if len(s) > echoBytes {
		return s[:echoBytes] + "…"
	}
	return s
}

// tooLargeError is a request over a size limit (413), saying which.
type tooLargeError struct{ msg string }

func (e *tooLargeError) Error() string { return e.msg }

// target is a validated push, ready to publish.
type target struct {
	// canonical renders the parameters that decide what is published, in
	// a fixed form, for the fingerprint of a request with an
	// Idempotency-Key; only such a request pays for it (a list of
	// thousands of targets is sorted).
	canonical func() string
	resolve   func(ctx context.Context, push Push) (*plan, error)
}

// pushRoute validates a request's parameters into a target.
type pushRoute func(a api, p *params) (target, error)

// headerValue returns a header given at most once, validated.
func headerValue(r *http.Request, name string, max int) (string, error) {
	vs := r.Header.Values(name)
	if len(vs) > 1 {
		return "", badParam(name, "given %d times, want once", len(vs))
	}
	if len(vs) == 0 {
		return "", nil
	}
	return vs[0], checkText(name, vs[0], max)
}

// fingerprint identifies a push's content: the route, its parameters in
// canonical form, the operation and the message.
func fingerprint(name string, op int32, t target, msg []byte) string {
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%d\n%s\n%d\n", name, op, t.canonical(), len(msg))
	h.Write(msg)
	return hex.EncodeToString(h.Sum(nil))
}

func (st *Stage) push(a api, name string, route pushRoute) http.Handler {
	label := strings.TrimPrefix(name, "push/") // keys, mids, room, all
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if st.metrics != nil {
			sw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
			defer func() { st.metrics.Push(label, sw.code) }()
			w = sw
		}
		corr, err := headerValue(r, "X-Request-ID", maxRequestIDBytes)
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		idemKey, err := headerValue(r, "Idempotency-Key", MaxIdempotencyKeyBytes)
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		p, err := readParams(r, a, st.cfg.MaxMessageBytes)
		var tooLarge *tooLargeError
		if errors.As(err, &tooLarge) {
			writeError(w, http.StatusRequestEntityTooLarge, tooLarge.Error())
			return
		}
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		op, err := p.operation()
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		t, err := route(a, p)
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		if corr == "" {
			corr = uuid.NewString()
		}
		ctx, cancel, settle := st.pushBudget(r.Context())
		defer cancel()
		req := newRequest(name, idemKey, corr, op, p.msg, t)
		o := st.accept(ctx, []pushRequest{req}, settle)[0]
		writeOutcome(w, a, o)
	})
}

// pushBudget bounds a push request: ctx for reserving, resolving and
// publishing, settle for completing or releasing its idempotency key.
// net/http does not cancel a handler's context at WriteTimeout: a publish
// blocked on the broker would run on, past the moment its Idempotency-Key
// reservation lapses (idempotency.InFlightTTL), and a retry could then
// reserve the key and publish again. The whole exchange is bounded well
// inside both.
func (st *Stage) pushBudget(parent context.Context) (ctx context.Context, cancel context.CancelFunc, settle time.Duration) {
	budget := min(st.cfg.WriteTimeout, idempotency.InFlightTTL)
	ctx, cancel = context.WithTimeout(parent, budget*pushShare/100)
	return ctx, cancel, budget * settleShare / 100
}

// Shares of min(logic.write_timeout, idempotency.InFlightTTL), in percent:
// reserving and publishing get pushShare, completing or releasing the key
// settleShare, so the reply is written and the key settled before either
// runs out (defaults: 22.5 s and 6 s of 30 s).
const (
	pushShare   = 75
	settleShare = 20
)

// writeOutcome answers a single push.
func writeOutcome(w http.ResponseWriter, a api, o outcome) {
	if o.status != http.StatusOK {
		if o.retryable() {
			w.Header().Set("Retry-After", "1")
		}
		writeError(w, o.status, o.err)
		return
	}
	if o.replayed {
		w.Header().Set("Idempotent-Replayed", "true")
	}
	writeData(w, a.okMessage(), o.body())
}

// logFailure logs a failing dependency, at most once a second: a broker
// outage fails every request.
func (st *Stage) logFailure(_ context.Context, msg string, args ...any) {
	st.failLog.Log(msg, args...)
}

// refuse answers a request without a valid API key and closes the
// connection without reading its body: a caller without a key gets
// nothing from the server but this answer.
func refuse(w http.ResponseWriter) {
	w.Header().Set("Connection", "close")
	writeError(w, http.StatusUnauthorized, "missing or wrong API key (Authorization: Bearer <key>)")
	// net/http would read up to 256 KB of the unread body before closing;
	// an expired read deadline ends that at once.
	_ = http.NewResponseController(w).SetReadDeadline(time.Now())
}

func (st *Stage) authorized(r *http.Request) bool {
	return st.keyAccepted(r.Header.Get("Authorization"))
}

// keyAccepted reports whether an Authorization value ("Bearer <key>")
// holds one of logic.api_keys; with none configured, every value is.
func (st *Stage) keyAccepted(authorization string) bool {
	keys := st.access.Load().keys
	if len(keys) == 0 {
		return true
	}
	// The scheme is case-insensitive (RFC 7235 section 2.1): "bearer" and
	// "BEARER" are the same scheme as "Bearer".
	scheme, got, ok := strings.Cut(authorization, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return false
	}
	// Hashes of equal length make the comparison take the same time
	// whatever the length of what was sent; every key is compared.
	sum := sha256.Sum256([]byte(got))
	match := 0
	for _, want := range keys {
		match |= subtle.ConstantTimeCompare(sum[:], want[:])
	}
	return match == 1
}

// canonicalList renders a list for a fingerprint: sorted, since the order
// of targets does not change what is published.
func canonicalList[T any](vs []T) string {
	parts := make([]string, len(vs))
	for i, v := range vs {
		parts[i] = strconv.Quote(fmt.Sprint(v))
	}
	slices.Sort(parts)
	return strings.Join(parts, ",")
}

// unique drops the repeats of a target list, keeping the first of each
// in order.
func unique[T comparable](list []T) []T {
	seen := make(map[T]struct{}, len(list))
	out := list[:0]
	for _, v := range list {
		if _, ok := seen[v]; !ok {
			seen[v] = struct{}{}
			out = append(out, v)
		}
	}
	return out
}

func (st *Stage) pushKeys(_ api, p *params) (target, error) {
	keys, err := p.strings("keys")
	if err != nil {
		return target{}, err
	}
	if len(keys) == 0 {
		return target{}, badParam("keys", "required")
	}
	// A key named twice is one recipient: one offline_keys entry, one
	// offline event (a repeated key was listed, and evented, twice).
	keys = unique(keys)
	for _, k := range keys {
		// A key a client may hold, and no other.
		if err := wire.ValidKey(k); err != nil {
			return target{}, wireError("keys", err)
		}
	}
	return target{
		canonical: func() string { return "keys=" + canonicalList(keys) },
		resolve: func(ctx context.Context, push Push) (*plan, error) {
			return st.pusher.resolveKeys(ctx, push, keys)
		},
	}, nil
}

func (st *Stage) pushMids(a api, p *params) (target, error) {
	raw, err := p.strings("mids")
	if err != nil {
		return target{}, err
	}
	if len(raw) == 0 {
		return target{}, badParam("mids", "required")
	}
	// goim's guests connect with mid 0, and goim pushes to them by it.
	least := int64(1)
	if a == apiGoim {
		least = 0
	}
	mids := make([]int64, 0, len(raw))
	for _, s := range raw {
		m, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
		if err != nil || m < least {
			return target{}, badParam("mids", "want integers of at least %d, got %s", least, echo(s))
		}
		mids = append(mids, m)
	}
	mids = unique(mids)
	return target{
		canonical: func() string { return "mids=" + canonicalList(mids) },
		resolve: func(ctx context.Context, push Push) (*plan, error) {
			return st.pusher.resolveMids(ctx, push, mids)
		},
	}, nil
}

func (st *Stage) pushRoom(_ api, p *params) (target, error) {
	typ, err := p.requiredString("type")
	if err != nil {
		return target{}, err
	}
	room, err := p.requiredString("room")
	if err != nil {
		return target{}, err
	}
	if err := checkRoom("room", typ, room); err != nil {
		return target{}, err
	}
	key := RoomKey(typ, room)
	return target{
		canonical: func() string { return "room=" + strconv.Quote(key) },
		resolve: func(ctx context.Context, push Push) (*plan, error) {
			return st.pusher.resolveRoom(ctx, push, key)
		},
	}, nil
}

func (st *Stage) pushAll(_ api, p *params) (target, error) {
	var speed int64
	if p.has("speed") {
		var err error
		if speed, err = p.int("speed", 32, 0, math.MaxInt32); err != nil {
			return target{}, err
		}
	}
	return target{
		canonical: func() string { return "speed=" + strconv.FormatInt(speed, 10) },
		resolve: func(ctx context.Context, push Push) (*plan, error) {
			return st.pusher.resolveAll(ctx, push, int32(speed))
		},
	}, nil
}

// RoomKey is the room id clients join: type://room.
func RoomKey(typ, room string) string { return typ + "://" + room }

// statusWriter remembers the status a handler answered with, for metrics.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	w.code = code
	w.ResponseWriter.WriteHeader(code)
}

// Unwrap lets http.ResponseController reach the connection beneath.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
